"use strict";
// Swagger UI over /openapi.json. The description and every call tried from it carry the
// API key the user gives here (kept for this tab, shared with the page at /): a browser
// cannot add a header to the page's own URL, so the page is open and the API is not.

const KEY_STORE = "resnet-serve.api-key";

function byId(id) {
  return document.getElementById(id);
}

function withKey(request) {
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) request.headers["X-API-Key"] = key;
  return request;
}

function askForKey(reason) {
  byId("key-section").hidden = false;
  byId("key-why").textContent = reason;
}

async function load() {
  let response;
  try {
    response = await fetch("/openapi.json", withKey({ headers: {} }));
  } catch (err) {
    askForKey("The service did not answer: " + err.message);
    return;
  }
  if (response.status === 401) {
    askForKey(sessionStorage.getItem(KEY_STORE)
      ? "That key was refused; enter another." : "This service needs an API key to show its API.");
    return;
  }
  if (!response.ok) {
    askForKey("The API description could not be loaded (HTTP " + response.status + ").");
    return;
  }
  const spec = await response.json();
  byId("swagger-ui").replaceChildren();
  window.SwaggerUIBundle({
    spec,
    dom_id: "#swagger-ui",
    requestInterceptor: withKey,
    deepLinking: true,
    layout: "BaseLayout",
  });
}

document.addEventListener("DOMContentLoaded", () => {
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, byId("key-input").value.trim());
    byId("key-input").value = "";
    byId("key-why").textContent = "Key kept for this tab.";
    load();
  });
  byId("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    byId("key-why").textContent = "Key forgotten.";
    byId("swagger-ui").replaceChildren();
  });
  if (sessionStorage.getItem(KEY_STORE)) byId("key-section").hidden = false;
  load();
});
