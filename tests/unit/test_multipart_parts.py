"""parse_parts reads upload forms as Starlette's parser (python-multipart) does, within the
same limits, and refuses any body it cannot read with a 4xx error, never another exception."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException

from app.api.multipart import MAX_FIELD_BYTES, FormPart, parse_form, parse_parts
from app.exceptions import MalformedRequestError, PayloadTooLargeError

BOUNDARY = "b0undary-x"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
CHECKED = settings(max_examples=150, deadline=None, database=None, derandomize=True)


def body_of(parts: list[tuple[str, str | None, bytes]], *, boundary: str = BOUNDARY,
            preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """A multipart body: (field name, file name or None, bytes) per part."""
    out = [preamble]
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode() + epilogue)
    return b"".join(out)


def starlette_parts(body: bytes, content_type: str = CONTENT_TYPE, *, max_files: int = 1000,
                    max_fields: int = 1000) -> list[FormPart]:
    """The same body as the service read it before, through Starlette's form parser."""

    async def parse() -> list[FormPart]:
        form = await parse_form(Headers({"content-type": content_type}), body,
                                max_files=max_files, max_fields=max_fields)
        try:
            return [FormPart(name, value.filename, await value.read())
                    if isinstance(value, UploadFile) else
                    FormPart(name, None, value.encode("utf-8", "surrogatepass"))
                    for name, value in form.multi_items()]
        finally:
            await form.close()

    return asyncio.run(parse())


def as_text(data: bytes) -> bytes:
    """A text field's bytes as Starlette's str of them, encoded back as starlette_parts does."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.encode("utf-8", "surrogatepass")


# no control characters or line separators: a header line holds none (python-multipart
# itself fails on them, so there is nothing to compare with)
names = st.text(st.characters(blacklist_characters='"\\',
                              blacklist_categories=["Cs", "Cc", "Zl", "Zp"]),
                min_size=1, max_size=12)
# file data that likes to look like boundaries and line breaks
chunks = st.lists(st.sampled_from([b"\r\n", b"--", BOUNDARY.encode(), b"\r", b"\n", b"-",
                                   b"\x00\xff", b"x"]), max_size=12).map(b"".join)
part = st.tuples(names, st.none() | names, chunks | st.binary(max_size=64))


@CHECKED
@given(st.lists(part, min_size=1, max_size=6), st.sampled_from([b"", b"\r\n", b"\r\n\r\n"]))
def test_any_form_reads_as_starlette_read_it(parts: list, preamble: bytes) -> None:
    body = body_of(parts, preamble=preamble, epilogue=b"ignored")
    # a part whose data holds the delimiter makes the body malformed (RFC 2046): there the
    # parsers may differ, as long as ours answers a 400
    delimiter = f"\r\n--{BOUNDARY}".encode()
    malformed = any(delimiter in b"\r\n" + data + b"\r" for _n, _f, data in parts)
    try:
        got = [p if p.filename is not None else FormPart(p.name, None, as_text(p.data))
               for p in parse_parts(body, CONTENT_TYPE, max_files=1000, max_fields=1000)]
    except MalformedRequestError:
        assert malformed
        return
    if not malformed:  # Starlette hands text fields over decoded (UTF-8, else latin-1)
        assert got == starlette_parts(body)


@CHECKED
@given(st.binary(max_size=300) | st.lists(st.sampled_from(
    [b"--" + BOUNDARY.encode(), b"\r\n", b"--", b"Content-Disposition: form-data; name=a",
     b"; filename=x", b":", b"x"]), max_size=20).map(b"".join))
def test_a_body_that_does_not_parse_is_a_400_and_nothing_else(body: bytes) -> None:
    try:
        parse_parts(body, CONTENT_TYPE, max_files=1000, max_fields=1000)
    except MalformedRequestError as exc:
        assert str(exc).startswith("cannot parse the multipart body: ")


def test_files_keep_their_bytes_and_names_in_order() -> None:
    data = b"\xff\xd8\r\n--not-the-boundary\r\n" * 100
    body = body_of([("file", "a.jpg", data), ("note", None, b"hello"), ("file", "", b"x")])
    assert parse_parts(body, CONTENT_TYPE, max_files=4, max_fields=4) == [
        FormPart("file", "a.jpg", data), FormPart("note", None, b"hello"),
        FormPart("file", "", b"x")]


def test_a_windows_path_and_an_encoded_name_give_the_file_name() -> None:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"C:\\\\photos\\\\cat.jpg\"\r\n\r\nA\r\n--{BOUNDARY}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''na%C3%AFve.jpg"
            f"\r\n\r\nB\r\n--{BOUNDARY}--\r\n").encode()
    parts = parse_parts(body, CONTENT_TYPE, max_files=4, max_fields=4)
    assert [(p.filename, p.data) for p in parts] == [("cat.jpg", b"A"), ("naïve.jpg", b"B")]
    assert parts == starlette_parts(body)


def test_too_many_files_is_413_counted_in_any_field() -> None:
    body = body_of([("file", "a", b"1"), ("other", "b", b"2"), ("file", "c", b"3")])
    with pytest.raises(PayloadTooLargeError, match="more than 2 images"):
        parse_parts(body, CONTENT_TYPE, max_files=2, max_fields=10)
    assert len(parse_parts(body, CONTENT_TYPE, max_files=3, max_fields=0)) == 3


def test_the_limits_on_text_fields_are_starlettes() -> None:
    fields = body_of([("a", None, b"1"), ("b", None, b"2")])
    with pytest.raises(MalformedRequestError, match="more than 1 text fields"):
        parse_parts(fields, CONTENT_TYPE, max_files=1, max_fields=1)
    with pytest.raises(MultiPartException):
        starlette_parts(fields, max_fields=1)
    big = body_of([("a", None, b"x" * (MAX_FIELD_BYTES + 1))])
    with pytest.raises(MalformedRequestError, match="over 1,048,576 bytes"):
        parse_parts(big, CONTENT_TYPE, max_files=1, max_fields=1)
    with pytest.raises(MultiPartException):
        starlette_parts(big)
    # a file of the same size is no text field
    assert parse_parts(body_of([("a", "f", b"x" * (MAX_FIELD_BYTES + 1))]), CONTENT_TYPE,
                       max_files=1, max_fields=0)[0].filename == "f"


@pytest.mark.parametrize(("body", "content_type", "reason"), [
    (body_of([("file", "a", b"1")]), "multipart/form-data", "no boundary"),
    (b"preamble\r\n" + body_of([("file", "a", b"1")]), CONTENT_TYPE, "does not start"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nno end".encode(),
     CONTENT_TYPE, "closing boundary"),
    (f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
     CONTENT_TYPE, '"name"'),
    (f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--".encode(), CONTENT_TYPE,
     "no ':'"),
    (f"--{BOUNDARY}\r\nX: y\r\n--{BOUNDARY}\r\n\r\n".encode(), CONTENT_TYPE, "do not end"),
    (f"--{BOUNDARY}xx".encode(), CONTENT_TYPE, "neither a line break"),
])
def test_broken_bodies_say_what_is_wrong(body: bytes, content_type: str, reason: str) -> None:
    with pytest.raises(MalformedRequestError, match=reason):
        parse_parts(body, content_type, max_files=4, max_fields=4)
