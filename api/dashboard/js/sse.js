// Server-sent events over fetch(): EventSource cannot send an Authorization header, and the
// token must never go into a URL. The parser follows the HTML standard's event-stream rules
// (fields, multi-line data, comments, CR/LF/CRLF line ends split across chunks).

import { request } from "./api.js";

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
    this.id = null;
  }

  /** Feed decoded text; returns the events completed by it, as {event, data, id}. */
  push(text) {
    this.buffer += text;
    const events = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) break;
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break; // maybe CRLF
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const event = this.line(line);
      if (event) events.push(event);
    }
    return events;
  }

  line(line) {
    if (line === "") {
      const done = this.data.length ? { event: this.event || "message", data: this.data.join("\n"), id: this.id } : null;
      this.reset();
      return done;
    }
    if (line.startsWith(":")) return null; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id") this.id = value;
    return null;
  }
}

/**
 * Read the event stream at `path` until it ends (resolves) or fails (rejects), calling
 * onEvent({event, data, id}) with `data` parsed as JSON where it is JSON.
 */
export async function readEvents(path, { signal, onEvent }) {
  const response = await request(path, { raw: true, signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    for (const event of parser.push(value)) {
      let data = event.data;
      try {
        data = JSON.parse(event.data);
      } catch {
        // plain text data
      }
      onEvent({ ...event, data });
    }
  }
}
