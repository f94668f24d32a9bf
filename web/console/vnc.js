// The VNC console page: noVNC's RFB client on the agent's WebSocket.
import RFB from "../novnc/core/rfb.js";
import { setStatus, socketUrl } from "./common.js";

const viewOnly = document.body.dataset.mode !== "read-write";
const rfb = new RFB(document.getElementById("screen"), socketUrl(),
                    { shared: true, wsProtocols: ["binary"] });
rfb.viewOnly = viewOnly;
rfb.scaleViewport = true;
rfb.addEventListener("connect", () => {
  setStatus("connected", viewOnly ? "connected (view only)" : "connected");
});
rfb.addEventListener("disconnect", (event) => {
  setStatus("closed", event.detail.clean ? "disconnected" : "connection lost");
});
rfb.addEventListener("securityfailure", (event) => {
  setStatus("closed", "refused: " + (event.detail.reason || event.detail.status));
});
window.virtnodeConsole = rfb;
