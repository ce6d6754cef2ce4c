// Every data call of the dashboard: same origin, bearer token, JSON errors turned into
// ApiError(status, message). Network failures raise NetworkError and light the banner;
// a 401 tells the app to sign the user out.

import { currentToken } from "./auth.js";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detailText(detail));
    this.status = status;
    this.detail = detail;
  }
}

export class NetworkError extends Error {}

/** A server `detail` as text: validation errors become `field: message` lines. */
export function detailText(detail) {
  if (Array.isArray(detail)) {
    return detail
      .map((d) => (d && typeof d === "object" ? `${d.field ?? (d.loc || []).join(".")}: ${d.msg}` : String(d)))
      .join("\n");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

function announce(name, detail) {
  window.dispatchEvent(new CustomEvent(name, { detail }));
}

/** fetch() with the token; `raw` returns the Response (streams, text), else the parsed JSON. */
export async function request(path, { method = "GET", body, signal, raw = false, token, accept } = {}) {
  const headers = { Accept: accept || "application/json" };
  const bearer = token ?? currentToken();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    announce("hmkd:network", { ok: false });
    throw new NetworkError(`cannot reach the service at ${location.origin}: ${err.message}`);
  }
  announce("hmkd:network", { ok: true });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail ?? detail;
    } catch {
      // not JSON: keep the status text
    }
    const error = new ApiError(response.status, detail);
    if (response.status === 401 && token === undefined) announce("hmkd:unauthorized", { message: error.message });
    throw error;
  }
  return raw ? response : response.json();
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const v of Array.isArray(value) ? value : [value]) {
      if (v !== undefined && v !== null && v !== "") search.append(key, v);
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}
