"""The queue panel: the running job and the jobs waiting behind it, with their main settings and,
for each waiting job, Up / Down / Cancel (or drag a waiting row onto another; on a touch screen by
its place number); below them the last finished jobs.

It reads the studio's own job queue (the one API clients use), so it shows the same jobs after a
page reload or when a script queues work over the API. One ``gr.HTML`` holds the whole list: the
rows change every second and per-row Gradio buttons would be rebuilt on each change, so the row
buttons are plain HTML and their clicks go to a server function of the component (Gradio 6's
``server_functions``), which acts on the queue and answers the list as it is afterwards.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio.jobs import JobQueue

if TYPE_CHECKING:   # the panel needs only ``studio.queue``; tests build it over a bare JobQueue
    from studio.core import Studio

# Refresh every second while a job runs or waits; when the queue is empty, look less often (a job
# submitted over the API or from another tab still shows within a few seconds).
BUSY_INTERVAL = 1.0
IDLE_INTERVAL = 2.0
PROMPT_CHARS = 60
RECENT_SHOWN = 8

ACTIONS = ("cancel", "up", "down", "first", "interrupt", "drop")

OUTCOME_MARKS = {"done": "✓", "interrupted": "◼", "failed": "✗", "cancelled": "⊘"}

# The row buttons' clicks, caught once on the component's root (its inner HTML is replaced on every
# refresh). The "Recent" <details> would close on each refresh: its open state is kept here.
PANEL_JS = """
let recentOpen = false;
element.addEventListener('toggle', (e) => {
  if (e.target.matches && e.target.matches('details.queue-recent')) recentOpen = e.target.open;
}, true);
const keepOpen = () => {
  const d = element.querySelector('details.queue-recent');
  if (d && d.open !== recentOpen) d.open = recentOpen;
};
// Drag a waiting row onto another: it lands before that row (after it when dropped on its lower
// half). The list is re-rendered every second, so the drag keeps the job's id, not the element, and
// the drop names the row it lands next to; the server places it beside that job as the queue is then.
let dragged = null;
let touchDrag = null;   // a finger's drag: {id, pointer}
const waitingRow = (e) => e.target.closest && e.target.closest('.queue-row.waiting');
const clearMarks = () => element.querySelectorAll('.drop-before, .drop-after, .dragging').forEach(
  (row) => row.classList.remove('drop-before', 'drop-after', 'dragging'));
const lowerHalf = (row, e) => { const r = row.getBoundingClientRect(); return e.clientY > r.top + r.height / 2; };
// the line where a drop on ``row`` would land (none when the pointer is over no waiting row)
const markDrop = (row, e) => {
  element.querySelectorAll('.drop-before, .drop-after').forEach((r) => {
    if (r !== row) r.classList.remove('drop-before', 'drop-after');
  });
  if (!row) return;
  const after = lowerHalf(row, e);
  row.classList.toggle('drop-after', after);
  row.classList.toggle('drop-before', !after);
};
const dropBeside = async (id, row, e) => {
  const after = row ? lowerHalf(row, e) : false;
  clearMarks();
  if (!id || !row || row.dataset.job === id) return;
  props.value = await server.queue_action({action: 'drop', id: id, beside: row.dataset.job, after: after});
  keepOpen();
};
element.addEventListener('dragstart', (e) => {
  const row = waitingRow(e);
  if (!row) return;
  dragged = row.dataset.job;
  e.dataTransfer.effectAllowed = 'move';
  e.dataTransfer.setData('text/plain', dragged);
  row.classList.add('dragging');
});
element.addEventListener('dragover', (e) => {
  const row = waitingRow(e);
  if (!dragged || !row) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = 'move';
  markDrop(row, e);
});
element.addEventListener('dragend', () => { dragged = null; clearMarks(); });
element.addEventListener('drop', (e) => {
  const id = dragged;
  dragged = null;
  if (id) e.preventDefault();
  return dropBeside(id, waitingRow(e), e);
});
// A refresh replaces the rows: the dragged one is marked again.
watch('value', () => {
  keepOpen();
  const id = dragged || (touchDrag && touchDrag.id);
  const row = id && element.querySelector(`.queue-row.waiting[data-job="${CSS.escape(id)}"]`);
  if (row) row.classList.add('dragging');
});
// A finger starts no HTML5 drag, so on touch screens (and pens) a waiting row's place number is a
// handle driven by pointer events; the moves are followed on the document because a refresh can
// replace the handle mid-drag (which ends its pointer capture).
const rowAt = (x, y) => {
  const hit = document.elementFromPoint(x, y);
  const row = hit && hit.closest && hit.closest('.queue-row.waiting');
  return row && element.contains(row) ? row : null;
};
const touchMove = (e) => {
  if (!touchDrag || e.pointerId !== touchDrag.pointer) return;
  e.preventDefault();
  markDrop(rowAt(e.clientX, e.clientY), e);
};
const touchStop = (e) => {
  if (!touchDrag || e.pointerId !== touchDrag.pointer) return;
  const id = touchDrag.id;
  touchDrag = null;
  document.removeEventListener('pointermove', touchMove);
  document.removeEventListener('pointerup', touchStop);
  document.removeEventListener('pointercancel', touchStop);
  return dropBeside(id, e.type === 'pointerup' ? rowAt(e.clientX, e.clientY) : null, e);
};
element.addEventListener('pointerdown', (e) => {
  if (e.pointerType === 'mouse' || touchDrag) return;
  const handle = e.target.closest && e.target.closest('.queue-row.waiting[draggable=true] .queue-place');
  if (!handle) return;
  e.preventDefault();
  const row = handle.closest('.queue-row');
  touchDrag = {id: row.dataset.job, pointer: e.pointerId};
  row.classList.add('dragging');
  document.addEventListener('pointermove', touchMove, {passive: false});
  document.addEventListener('pointerup', touchStop);
  document.addEventListener('pointercancel', touchStop);
});
element.addEventListener('click', async (e) => {
  const btn = e.target.closest('button[data-queue-action]');
  if (!btn || btn.disabled) return;
  btn.disabled = true;
  try {
    props.value = await server.queue_action({action: btn.dataset.queueAction, id: btn.dataset.job});
  } finally {
    btn.disabled = false;
    keepOpen();
  }
});
"""

PANEL_CSS = """
.queue-list { display: flex; flex-direction: column; gap: 4px; font-size: var(--text-sm); }
.queue-row { display: flex; align-items: center; gap: 6px; padding: 4px 6px; border-radius: var(--radius-sm);
  border: 1px solid var(--border-color-primary); background: var(--background-fill-secondary); }
.queue-row.running { border-color: var(--color-accent); }
.queue-row.waiting[draggable=true] { cursor: grab; }
/* the touch handle: no scrolling starts from it, and a grip shows it can be dragged */
.queue-row.waiting[draggable=true] .queue-place { touch-action: none; align-self: stretch; display: flex;
  align-items: center; justify-content: center; }   /* a finger-sized target: the row's height */
.queue-row.waiting[draggable=true] .queue-place::before { content: '⠿'; margin-right: 2px;
  color: var(--body-text-color-subdued); font-weight: 400; }
.queue-row.dragging { opacity: .45; }
.queue-row.drop-before { box-shadow: inset 0 3px 0 var(--color-accent); }
.queue-row.drop-after { box-shadow: inset 0 -3px 0 var(--color-accent); }
.queue-place { flex: 0 0 auto; min-width: 2.4em; font-weight: 600; text-align: center; }
.queue-text { flex: 1 1 auto; min-width: 0; }
.queue-prompt { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.queue-meta { color: var(--body-text-color-subdued); font-size: var(--text-xs); overflow-wrap: anywhere; }
.queue-bar { height: 3px; background: var(--color-accent); border-radius: 2px; margin-top: 2px; }
.queue-buttons { flex: 0 0 auto; display: flex; gap: 2px; }
.queue-buttons button { min-width: 28px; height: 26px; padding: 0 6px; cursor: pointer;
  border: 1px solid var(--border-color-primary); border-radius: var(--radius-sm);
  background: var(--button-secondary-background-fill); color: var(--button-secondary-text-color); }
.queue-buttons button:hover:not(:disabled) { background: var(--button-secondary-background-fill-hover); }
.queue-buttons button:disabled { opacity: .35; cursor: default; }
.queue-note { color: var(--body-text-color-subdued); font-style: italic; padding: 2px 6px; }
.queue-empty { color: var(--body-text-color-subdued); padding: 2px 6px; }
.queue-recent summary { cursor: pointer; color: var(--body-text-color-subdued); padding: 2px 6px; }
.queue-recent .queue-row { background: none; }
.queue-recent .failed .queue-place { color: var(--color-red-500, #dc2626); }
"""


def _prompt_start(text: str) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS - 1] + "…"


def settings_line(request: dict[str, Any]) -> str:
    """A job's main settings in one line: size, steps, sampler, seed, batch (count × size), CFG, model."""
    parts = []
    if request.get("width") and request.get("height"):
        parts.append(f"{request['width']}×{request['height']}")
    if request.get("steps"):
        parts.append(f"{request['steps']} steps")
    if request.get("sampler_name"):
        parts.append(str(request["sampler_name"]))
    if "seed" in request:
        parts.append("random seed" if request["seed"] in (-1, None) else f"seed {request['seed']}")
    n_iter, size = request.get("n_iter") or 1, request.get("batch_size") or 1
    if n_iter * size > 1:
        parts.append(f"batch {n_iter}×{size}")
    if request.get("cfg_scale") is not None:
        parts.append(f"CFG {request['cfg_scale']:g}")
    if request.get("checkpoint"):
        parts.append(str(request["checkpoint"]))
    return " · ".join(parts)


def _describe(entry: dict[str, Any]) -> tuple[str, str]:
    """The row's first line (the prompt's start, or the job's kind for loads and the like) and its
    second line (kind and settings)."""
    request = entry.get("request") or {}
    kind = str(entry.get("description") or "job")
    prompt = _prompt_start(str(request.get("prompt") or ""))
    settings = settings_line(request)
    if not prompt:
        return kind, settings
    return prompt, " · ".join(p for p in (kind, settings) if p)


def _button(action: str, job_id: str, label: str, title: str, enabled: bool = True) -> str:
    return (f"<button type='button' data-queue-action='{action}' data-job='{html.escape(job_id, quote=True)}' "
            f"title='{html.escape(title, quote=True)}' aria-label='{html.escape(title, quote=True)}'"
            f"{'' if enabled else ' disabled'}>{label}</button>")


def _row(place: str, entry: dict[str, Any], classes: str, extra: str = "", buttons: str = "",
         lead: str = "", draggable: bool = False) -> str:
    """One job: its place (or mark), prompt start, and a line of ``lead`` + settings + ``extra``
    (``lead``/``extra`` are HTML, already escaped). ``draggable``: a waiting row the user may drag."""
    first, second = _describe(entry)
    job_id = html.escape(str(entry.get("id", "")), quote=True)
    drag = " draggable='true' title='Drag onto another waiting job to reorder'" if draggable else ""
    return (f"<div class='queue-row {classes}' data-job='{job_id}'{drag}><span class='queue-place'>{place}</span>"
            f"<div class='queue-text'><div class='queue-prompt' title='{html.escape(first, quote=True)}'>"
            f"{html.escape(first)}</div><div class='queue-meta'>{lead}{html.escape(second)}{extra}</div></div>"
            f"{f'<span class=queue-buttons>{buttons}</span>' if buttons else ''}</div>")


def queue_html(view: dict[str, Any], now: float | None = None, note: str = "") -> str:
    """The panel's list from :meth:`studio.jobs.QueueSnapshot.as_dict` (the same dict GET
    /studio/v1/queue answers); ``note``: a line above it (why a button did nothing)."""
    now = time.time() if now is None else now
    rows = [f"<div class='queue-note'>{html.escape(note)}</div>"] if note else []
    # every running job (several at once with generation workers), the longest-running first
    all_running = view.get("running_all") or ([view["running"]] if view.get("running") else [])
    running = all_running[0] if all_running else None
    for job in all_running:
        progress = float(job.get("progress") or 0.0)
        extra = ""
        if job.get("total"):
            eta = job.get("eta")
            extra = f" · {progress * 100:.0f}%" + (f" · ETA {eta:.0f}s" if eta is not None else "")
        if job.get("worker"):
            extra += f" · worker {job['worker']}"
        buttons = _button("interrupt", job["id"], "◼", "Interrupt (keeps what is done)")
        bar = f"<div class='queue-bar' style='width:{progress * 100:.0f}%'></div>" if progress else ""
        rows.append(_row("▶", job, "running", html.escape(extra) + bar, buttons))
    waiting = view.get("waiting") or []
    for i, entry in enumerate(waiting):
        job_id = str(entry["id"])
        buttons = (_button("up", job_id, "↑", "Move up", enabled=i > 0)
                   + _button("down", job_id, "↓", "Move down", enabled=i < len(waiting) - 1)
                   + _button("cancel", job_id, "✕", "Cancel (remove from the queue)"))
        waited = max(0.0, now - float(entry.get("submitted") or now))
        rows.append(_row(str(entry.get("position", i + 1)), entry, "waiting",
                         html.escape(f" · waiting {waited:.0f}s"), buttons, draggable=len(waiting) > 1))
    if not running and not waiting:
        rows.append("<div class='queue-empty'>Nothing running or queued. Generate while a job runs to "
                    "queue the next one.</div>")
    recent = (view.get("recent") or [])[:RECENT_SHOWN]
    if recent:
        items = []
        for entry in recent:
            outcome = str(entry.get("outcome", "done"))
            finished = time.strftime("%H:%M:%S", time.localtime(float(entry.get("finished") or now)))
            duration = entry.get("duration")
            # how it ended first: on a phone the line wraps, and this is what the list is for
            lead = f"{outcome} {finished}" + (f" in {duration:.1f}s" if duration is not None else "")
            if entry.get("error"):
                lead += f" ({entry['error']})"
            items.append(_row(OUTCOME_MARKS.get(outcome, "·"), entry, outcome, lead=html.escape(lead + " · ")))
        rows.append(f"<details class='queue-recent'><summary>Recent ({len(recent)})</summary>"
                    f"<div class='queue-list'>{''.join(items)}</div></details>")
    return f"<div class='queue-list'>{''.join(rows)}</div>"


def queue_label(count: int) -> str:
    return f"Queue ({count})"


def apply_action(queue: JobQueue, action: str, job_id: str, beside: str = "", after: bool = False) -> str | None:
    """Do what a row button (or a drag and drop: ``drop`` beside the job ``beside``, before it or
    ``after`` it) asks. Returns a message when nothing could be done (the job started or finished
    meanwhile); None when it was done."""
    if action not in ACTIONS:
        return f"unknown queue action {action!r}"
    if action == "interrupt":   # that job only (with several workers, the others run on)
        if not queue.interrupt(job_id):
            return f"{job_id} is not running any more"
        return None
    if action == "cancel":
        done = queue.cancel(job_id)
    elif action == "first":
        done = queue.move(job_id, 0) is not None
    elif action == "drop":
        done = queue.place(job_id, beside, after) is not None
    else:
        done = queue.shift(job_id, -1 if action == "up" else 1) is not None
    return None if done else f"{job_id} is no longer waiting (it has started or finished)"


def waiting_text(queue: JobQueue, job_id: str) -> str | None:
    """"Waiting in queue: position 2 of 3" while ``job_id`` waits; None once it runs or has ended.
    For the generation tabs' progress line (``stream_job``), so a queued Generate says where it is."""
    snapshot = queue.snapshot()
    for i, job in enumerate(snapshot.waiting, start=1):
        if job.state.job_id == job_id:
            return f"Waiting in queue: position {i} of {len(snapshot.waiting)}"
    return None


@dataclass
class QueuePanel:
    """``accordion`` holds ``list`` (the rows); ``timer`` refreshes both. :meth:`wake` makes the next
    refresh come at once, e.g. chained after a Generate click: ``.then(panel.wake, None, panel.outputs())``."""
    accordion: gr.Accordion
    rows: gr.HTML
    timer: gr.Timer
    refresh: Callable[[], tuple[Any, Any, Any]]

    def outputs(self) -> list[Any]:
        return [self.rows, self.accordion, self.timer]

    def wake(self) -> tuple[Any, Any, Any]:
        return self.refresh()


def build_queue_panel(studio: Studio, tab_id: str = "queue", open: bool = True) -> QueuePanel:
    """The panel, built where it is called (a generation tab's right column, under the gallery or
    the Generate button). ``tab_id`` prefixes its elem_ids (``txt2img_queue``, ``txt2img_queue_list``)."""
    queue = studio.queue

    def render(note: str = "") -> str:
        return queue_html(queue.snapshot().as_dict(), note=note)

    def refresh() -> tuple[Any, Any, Any]:
        snapshot = queue.snapshot()
        count = snapshot.job_count
        return (queue_html(snapshot.as_dict()), gr.Accordion(label=queue_label(count)),
                gr.Timer(BUSY_INTERVAL if count else IDLE_INTERVAL))

    def queue_action(data: dict[str, Any]) -> str:
        # called from the row buttons' JS with {"action": ..., "id": ...}; answers the new list
        data = data if isinstance(data, dict) else {}
        # no event here to carry a gr.Warning: a refused action says why in the list itself
        return render(apply_action(queue, str(data.get("action", "")), str(data.get("id", "")),
                                   str(data.get("beside", "")), data.get("after") is True) or "")

    with gr.Accordion(queue_label(queue.job_count), open=open, elem_id=f"{tab_id}_queue") as accordion:
        panel = gr.HTML(render(), elem_id=f"{tab_id}_queue_list", js_on_load=PANEL_JS, css_template=PANEL_CSS,
                        server_functions=[queue_action], min_height=0)
    timer = gr.Timer(BUSY_INTERVAL)
    out = QueuePanel(accordion, panel, timer, refresh)
    timer.tick(refresh, None, out.outputs(), queue=False, show_progress="hidden")
    # no triggers = on every page load: a reload shows the server's queue (and its count) at once
    gr.on(None, refresh, None, out.outputs(), queue=False, show_progress="hidden")
    return out
