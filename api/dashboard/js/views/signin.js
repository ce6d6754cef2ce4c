// Sign in with an API token: checked against /v1/me before it is kept.

import { request } from "../api.js";
import { saveToken } from "../auth.js";
import { code, h } from "../dom.js";

export function signInView(root, { message, onSignedIn }) {
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", required: true, placeholder: "hmkd_…", spellcheck: "false" });
  const remember = h("input", { type: "checkbox", id: "remember" });
  const status = h("div", { id: "signin-status", role: "status" }, message ? h("p", { class: "muted" }, message) : "");
  const submit = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    { class: "card signin", id: "signin-form" },
    h("h1", {}, "Sign in to HMKD"),
    h("label", { for: "token" }, "API token"),
    input,
    h("label", { class: "check" }, remember, " Remember on this computer"),
    submit,
    status,
    h(
      "div",
      { class: "muted small" },
      h("p", {}, "On a local service (", code("hmkd serve"), ") the admin token is in ", code("<data dir>/token"), " (", code(".hmkd/token"), " after ", code("./scripts/demo.sh"), ")."),
      h("p", {}, "Otherwise ask an admin: ", code("hmkd tokens create --user NAME"), "."),
    ),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    submit.disabled = true;
    status.replaceChildren(h("p", { class: "muted" }, "Checking…"));
    try {
      const user = await request("/v1/me", { token });
      saveToken(token, remember.checked);
      onSignedIn(user);
    } catch (err) {
      const text = err.status === 401 ? "That token is unknown or revoked. Check it, or ask an admin for a new one." : err.message;
      status.replaceChildren(h("p", { class: "error", role: "alert" }, text));
      submit.disabled = false;
      input.select();
    }
  });
  root.replaceChildren(form);
  input.focus();
  return () => {};
}
