// What both console pages share: the WebSocket URL (this very page's, whose token the
// socket uses once), and the status line.
export function socketUrl() {
  const url = new URL(window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.hash = "";
  return url.href;
}

export function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
  document.body.dataset.state = state;
}
