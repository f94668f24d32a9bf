// The serial console page: xterm.js on the agent's WebSocket. Binary frames carry the
// console's bytes both ways; text frames from the agent are JSON notices.
import { Terminal } from "../xterm/lib/xterm.mjs";
import { setStatus, socketUrl } from "./common.js";

const readOnly = document.body.dataset.mode !== "read-write";
const term = new Terminal({ convertEol: false, scrollback: 10000,
                            disableStdin: readOnly, cursorBlink: !readOnly });
term.open(document.getElementById("terminal"));
const socket = new WebSocket(socketUrl(), ["binary"]);
socket.binaryType = "arraybuffer";
const encoder = new TextEncoder();
socket.onopen = () => setStatus("connected", readOnly ? "connected (read only)" : "connected");
socket.onmessage = (message) => {
  if (typeof message.data === "string") {
    const notice = JSON.parse(message.data);
    if (notice.type === "notice") term.write("\r\n[" + notice.message + "]\r\n");
    return;
  }
  term.write(new Uint8Array(message.data));
};
socket.onclose = (event) => {
  setStatus("closed", "disconnected" + (event.reason ? ": " + event.reason : ""));
};
if (!readOnly) {
  term.onData((data) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });
}
term.focus();
window.virtnodeConsole = term;
