// The API token lives in this tab's sessionStorage, or in localStorage when the user asks to be
// remembered on this computer. It only ever travels in an Authorization header.

const KEY = "hmkd.token";

export function currentToken() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || null;
}

export function saveToken(token, remember) {
  forgetToken();
  (remember ? localStorage : sessionStorage).setItem(KEY, token);
}

export function forgetToken() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}
