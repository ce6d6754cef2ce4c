// The dashboard's shell: sign-in gate, header, network banner and a router over the URL's
// fragment (#/queue, #/jobs?state=running, #/jobs/<id>, #/compare?ids=a,b). Each view renders
// into <main> and returns a function that stops its timers and streams.

import { request } from "./api.js";
import { currentToken, forgetToken } from "./auth.js";
import { h } from "./dom.js";
import { compareView } from "./views/compare.js";
import { datasetView, datasetsView } from "./views/datasets.js";
import { jobView } from "./views/job.js";
import { jobsView } from "./views/jobs.js";
import { queueView } from "./views/queue.js";
import { signInView } from "./views/signin.js";

const ROUTES = [
  [/^\/?$/, "queue", queueView],
  [/^\/queue$/, "queue", queueView],
  [/^\/jobs$/, "jobs", jobsView],
  [/^\/jobs\/([0-9a-f]{32})$/, "jobs", jobView],
  [/^\/compare$/, "compare", compareView],
  [/^\/datasets$/, "datasets", datasetsView],
  [/^\/datasets\/([^/?]+)$/, "datasets", datasetView],
];

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOutButton = document.getElementById("signout");
const banner = document.getElementById("banner");
let stopView = () => {};
let me = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, "");
  const [path, search = ""] = raw.split("?");
  return { path, params: new URLSearchParams(search) };
}

function setSignedIn(user) {
  me = user;
  nav.hidden = !user;
  signOutButton.hidden = !user;
  who.replaceChildren(user ? h("span", {}, user.name, h("span", { class: "muted" }, ` · team ${user.team}`)) : "");
}

function showSignIn(message) {
  stopView();
  setSignedIn(null);
  stopView = signInView(view, { message, onSignedIn: (user) => { setSignedIn(user); route(); } }) || (() => {});
}

function route() {
  if (!me) return;
  stopView();
  const { path, params } = parseHash();
  for (const [pattern, name, render] of ROUTES) {
    const match = pattern.exec(path);
    if (match) {
      for (const link of nav.querySelectorAll("a")) link.classList.toggle("active", link.dataset.route === name);
      view.replaceChildren();
      stopView = render(view, { params, match, me }) || (() => {});
      return;
    }
  }
  view.replaceChildren(
    h("div", { class: "empty" }, h("h3", {}, "No such page"), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs"))),
  );
  stopView = () => {};
}

async function start() {
  window.addEventListener("hashchange", route);
  window.addEventListener("hmkd:unauthorized", (e) => {
    forgetToken();
    showSignIn(`The service refused your token: ${e.detail.message}`);
  });
  window.addEventListener("hmkd:network", (e) => {
    banner.hidden = e.detail.ok;
    if (!e.detail.ok) banner.textContent = `Cannot reach the HMKD service at ${location.origin}; retrying…`;
  });
  signOutButton.addEventListener("click", () => {
    forgetToken();
    showSignIn("Signed out.");
  });
  if (!currentToken()) {
    showSignIn();
    return;
  }
  try {
    setSignedIn(await request("/v1/me"));
    route();
  } catch (err) {
    if (err.status !== 401) {
      view.replaceChildren(h("div", { class: "error", role: "alert" }, `Could not check your token: ${err.message}`));
    }
  }
}

start();
