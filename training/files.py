"""The files a run keeps in its output folder that only training reads.

The checkpoint's own files and its reports are named in models.checkpoint (the server reads
them too); the temp and staging names of atomic writes in models.atomic.
"""

RESUME_FILE = "last.pt"  # the resume state, rewritten after every epoch
SPLIT_FILE = "split.json"  # the train/validation split, re-used by --resume

