// Keys: 1 = left better, 2 = right better, 0 = tie, s = skip, u = undo. Each key clicks its button,
// so a key and a click send the same form; a form is sent once (a second press is ignored).
(function () {
  let sent = false;
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || sent) return;
    const tag = (event.target && event.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    const button = document.querySelector('button[data-key="' + event.key.toLowerCase() + '"]');
    if (!button || button.disabled) return;
    event.preventDefault();
    button.classList.add("pressed");
    button.click();
  });
  document.addEventListener("submit", function (event) {
    if (sent) { event.preventDefault(); return; }
    sent = true;
  });
  window.addEventListener("pageshow", function () { sent = false; });   // back button: page is live again
})();
