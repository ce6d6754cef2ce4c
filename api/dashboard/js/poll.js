// Repeat an async refresh every `ms` until stopped; a failed round is shown by the caller and
// retried on the next tick, so a restart of the service heals the page by itself.

export function every(ms, refresh) {
  let timer = null;
  let stopped = false;
  const controller = new AbortController();
  async function tick() {
    try {
      await refresh(controller.signal);
    } catch (err) {
      if (err.name !== "AbortError") console.debug("refresh failed", err);
    }
    if (!stopped) timer = setTimeout(tick, ms);
  }
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
    controller.abort();
  };
}
