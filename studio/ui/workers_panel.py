"""The Workers tab (with --workers / --ray-address): every generation worker with its node, process,
device, loaded checkpoints, state, the job it runs and how many it has done, refreshed every two
seconds; the Ray dashboard's link when it runs. The same data as GET /studio/v1/workers."""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any

import gradio as gr

if TYPE_CHECKING:
    from studio.core import Studio

REFRESH_S = 2.0

CSS = """
#workers_table table { width: 100%; border-collapse: collapse; font-size: 0.9em; }
#workers_table th, #workers_table td { text-align: left; padding: 4px 8px; vertical-align: top;
  border-bottom: 1px solid var(--border-color-primary); }
#workers_table .state-busy { color: var(--color-accent); font-weight: 600; }
#workers_table .state-lost { color: var(--error-text-color, #c00); font-weight: 600; }
#workers_table .wrap { overflow-x: auto; }
"""

COLUMNS = ("Worker", "Node", "PID", "Device", "Checkpoints loaded", "State", "Job", "Done", "Failed")


def _device_short(label: str) -> str:
    # the policy label is long ("cpu · bfloat16 (VAE …) · sdpa · …"): its first two parts say enough here
    return " · ".join(str(label).split(" · ")[:2])


def workers_html(status: dict[str, Any], now: float | None = None) -> str:
    """The panel's HTML for :meth:`Studio.workers_status`'s answer."""
    esc = html.escape
    parts = []
    if status.get("error"):
        parts.append(f"<p class='state-lost'>⚠ {esc(str(status['error']))}</p>")
    elif not status.get("ready", True):
        parts.append("<p>Starting the generation workers…</p>")
    address = str(status.get("address") or "local")
    if not status.get("enabled"):
        mode = "this process"
    else:
        mode = "a local Ray cluster" if address == "local" else f"the Ray cluster at {esc(address)}"
    line = f"<p>Generation on <b>{mode}</b> · {len(status.get('workers', []))} of " \
           f"{status.get('planned_workers', 1)} worker(s) reporting"
    if status.get("dashboard_url"):
        url = esc(str(status["dashboard_url"]))
        line += f" · <a href='{url}' target='_blank' rel='noopener'>Ray dashboard</a>"
    parts.append(line + "</p>")
    rows = []
    for w in status.get("workers", []):
        state = str(w.get("state", ""))
        checkpoints = "<br>".join(esc(str(c)) for c in w.get("checkpoints") or []) or "–"
        error = f"<br><small class='state-lost'>{esc(str(w['error']))}</small>" if w.get("error") else ""
        cells = (esc(str(w.get("id", ""))), esc(str(w.get("node", ""))), esc(str(w.get("pid", ""))),
                 esc(_device_short(w.get("device", ""))), checkpoints,
                 f"<span class='state-{esc(state)}'>{esc(state)}</span>{error}", esc(str(w.get("job") or "–")),
                 esc(str(w.get("jobs_done", 0))), esc(str(w.get("failures", 0))))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join(rows) or f"<tr><td colspan='{len(COLUMNS)}'>No worker has reported yet.</td></tr>"
    parts.append(f"<div class='wrap'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
    stamp = time.strftime("%H:%M:%S", time.localtime(now or time.time()))
    parts.append(f"<p><small>Updated {stamp}</small></p>")
    return "".join(parts)


def build_workers_tab(studio: Studio) -> gr.HTML:
    """The tab's content, built where it is called (inside a ``gr.Tab``)."""
    panel = gr.HTML(workers_html(studio.workers_status()), elem_id="workers_table")
    timer = gr.Timer(REFRESH_S)
    timer.tick(lambda: workers_html(studio.workers_status()), None, panel, show_progress="hidden", queue=False)
    return panel
