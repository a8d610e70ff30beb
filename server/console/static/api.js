// The public HTTP API as the console uses it: the key of this browser tab, JSON errors, server-sent events.

const KEY_NAME = "ttt-api-key";

export class ApiError extends Error {
  // status: the HTTP status; code: the error's own code when it has one (e.g. "session_busy" for a 409)
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// A 401 anywhere sends the user back to the key prompt: set by the page.
let onUnauthorized = () => {};
export function whenUnauthorized(callback) { onUnauthorized = callback; }

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_NAME),
  set: (key) => sessionStorage.setItem(KEY_NAME, key),
  clear: () => sessionStorage.removeItem(KEY_NAME),
};

async function failure(response) {
  try {
    const { message, code } = (await response.json()).error;
    return new ApiError(response.status, message, code);
  } catch {
    return new ApiError(response.status, `${response.status} ${response.statusText}`);
  }
}

// fetch with the key; a response that is not 2xx throws ApiError with the server's message.
export async function request(path, { method = "GET", json, body, accept, signal } = {}) {
  const headers = {};
  const key = apiKey.get();
  if (key) headers.authorization = `Bearer ${key}`;
  if (json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(json);
  } else if (body !== undefined) {
    headers["content-type"] = "text/plain; charset=utf-8";
  }
  if (accept) headers.accept = accept;
  const response = await fetch(path, { method, headers, body, signal });
  if (!response.ok) {
    const error = await failure(response);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return response;
}

export const getJson = async (path) => (await request(path)).json();
export const sendJson = async (path, json, method = "POST") => (await request(path, { method, json })).json();

// The JSON objects of a server-sent events response, up to `data: [DONE]`; an error event throws.
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new ApiError(payload.error.code, payload.error.message);
      yield payload;
    }
  }
}

export const isAbort = (error) => error?.name === "AbortError";
