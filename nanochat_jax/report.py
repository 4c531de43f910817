"""The training report card: one markdown file per stage under <base_dir>/report/ (as nanochat).

`log_section("Base model training", [user_config, {"Number of parameters": n}, ...])` writes
`report/base-model-training.md` with a `## Base model training` heading, a timestamp, and each
item: strings verbatim, dicts as `- key: value` lines (floats to 4 decimals, ints >= 10000 with
thousands separators), exactly like nanochat's report.log.

    python -m nanochat_jax.report reset      # start of a run: clear old sections, write header.md
    python -m nanochat_jax.report generate   # end of a run: report.md = header + sections + summary

`reset` records the environment (git, hardware, JAX devices, software versions, the code's
"bloat") and the run's start time; `generate` stitches the sections together in pipeline order
and ends with nanochat's summary: the bloat, the metric table `Metric | BASE | MID | SFT | RL`,
the total wall-clock time and (our addition) the estimated cost at the header's hourly rate.

Our addition too: a "Plots" section before the summary, one SVG chart per training stage (base,
mid, sft, rl) of each model tag, drawn from `<base_dir>/runs/<tag>/<phase>/metrics.jsonl` (the
`MetricsWriter` logs): `report/plots/<tag>-<phase>.svg`, linked as `plots/<tag>-<phase>.svg`.
The copy of report.md in the current directory links to a copy of them in `report_plots/` there
(a folder named `plots/` in someone's checkout may be theirs).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nanochat_jax.common import atomic_write_text, get_base_dir, get_logger
from nanochat_jax.plots import Panel, Series, render_svg

log = get_logger("nanochat_jax.report")  # not __name__: "__main__" under python -m

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TITLE = "nanochat-jax training report"
# nanochat's section files, in pipeline order (slugs of the titles the stages log)
EXPECTED_SECTIONS = (
    "tokenizer-training",
    "tokenizer-evaluation",
    "base-model-training",
    "base-model-loss",
    "base-model-evaluation",
    "midtraining",
    "chat-evaluation-mid",
    "chat-sft",
    "chat-evaluation-sft",
    "chat-rl",
    "chat-evaluation-rl",
)
# RL is optional and experimental in nanochat, so its timestamps do not end the wall clock
_RL_SECTIONS = frozenset({"chat-rl", "chat-evaluation-rl"})
CHAT_METRICS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")
# section slug -> (summary column, metrics read from it); RL evaluates GSM8K only
_SUMMARY_SOURCES = {
    "base-model-evaluation": ("BASE", ("CORE",)),
    "chat-evaluation-mid": ("MID", CHAT_METRICS),
    "chat-evaluation-sft": ("SFT", CHAT_METRICS),
    "chat-evaluation-rl": ("RL", ("GSM8K",)),
}
_COLUMNS = ("BASE", "MID", "SFT", "RL")
_METRIC_WIDTH, _VALUE_WIDTH = 15, 8  # nanochat's fixed table column widths
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# Lambda-like on-demand prices per GPU-hour (nanochat's table; H200 billed like H100)
_HOURLY_RATES = (("H100", 3.00), ("H200", 3.00), ("A100", 1.79), ("V100", 0.55))
_DEFAULT_HOURLY_RATE = 2.00
# what nanochat's files-to-prompt call packages: these extensions, no build outputs or caches
_BLOAT_SUFFIXES = frozenset({".py", ".md", ".rs", ".html", ".toml", ".sh"})
_BLOAT_SKIP_DIRS = frozenset(
    {"target", "__pycache__", "node_modules", "build", "dist", "runs", "vendor"}
)
_SOFTWARE = (
    ("JAX", "jax"),
    ("jaxlib", "jaxlib"),
    ("Flax", "flax"),
    ("Optax", "optax"),
    ("Orbax", "orbax-checkpoint"),
)


def report_dir(base_dir: str | Path | None = None) -> Path:
    path = (Path(base_dir) if base_dir else get_base_dir()) / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(section: str) -> str:
    return section.lower().replace(" ", "-")


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


def render_section(section: str, items: Iterable[str | dict], now: datetime.datetime) -> str:
    lines = [f"## {section}", f"timestamp: {now:%Y-%m-%d %H:%M:%S}", ""]
    for item in items:
        if not item:  # nanochat skips empty items (e.g. no ChatCORE when not all tasks ran)
            continue
        if isinstance(item, dict):
            lines += [f"- {key}: {_format_value(value)}" for key, value in item.items()]
        else:
            lines.append(str(item))
        lines.append("")
    return "\n".join(lines)


def log_section(
    section: str, items: Iterable[str | dict], base_dir: str | Path | None = None
) -> Path:
    """Write (atomically) the section's markdown file; returns its path."""
    path = report_dir(base_dir) / f"{slug(section)}.md"
    atomic_write_text(path, render_section(section, items, datetime.datetime.now()))
    return path


# ---------------------------------------------------------------------------------------------
# reset: the header


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _git_lines(root: Path) -> list[str]:
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if commit is None:
        return ["- Branch: unknown", "- Commit: unknown (not a git checkout)", "- Message: "]
    status = _git(root, "status", "--porcelain")
    state = "unknown" if status is None else ("dirty" if status else "clean")
    message = (_git(root, "log", "-1", "--pretty=%B") or "").split("\n")[0][:80]
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD") or "unknown"
    return [f"- Branch: {branch}", f"- Commit: {commit} ({state})", f"- Message: {message}"]


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where that file says nothing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores, package = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            package = value.strip()
        elif key == "core id":
            cores.add((package, value.strip()))
    return len(cores) or None


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return None


def _cuda_version() -> str | None:
    """The CUDA runtime JAX runs on: the pip CUDA wheels of JAX's plugin, else the backend's word.

    Only the runtime of the plugin's CUDA major counts: torch (the `torch` extra) may bring another.
    """
    for major in ("13", "12"):
        try:
            importlib.metadata.version(f"jax-cuda{major}-plugin")
        except importlib.metadata.PackageNotFoundError:
            continue
        for package in (f"nvidia-cuda-runtime-cu{major}", "nvidia-cuda-runtime"):
            try:
                version = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                continue
            if version.split(".")[0] == major:
                return ".".join(version.split(".")[:2])
    try:
        from jax.extend.backend import get_backend

        found = re.fullmatch(r"cuda (\d+)", get_backend().platform_version.strip())
    except (ImportError, RuntimeError, AttributeError):
        return None
    if found is None:
        return None
    number = int(found.group(1))  # CUDA's integer encoding: 12080 = 12.8
    return f"{number // 1000}.{number % 1000 // 10}"


def hourly_rate(platform_name: str, device_kind: str, count: int) -> float | None:
    """Estimated $/hour for `count` accelerators of this kind; None for CPUs (nothing to rent)."""
    if platform_name == "cpu":
        return None
    for name, rate in _HOURLY_RATES:
        if name in device_kind:
            return rate * count
    return _DEFAULT_HOURLY_RATE * count


def _accelerator_lines() -> list[str]:
    try:
        import jax

        devices = jax.devices()
        local = jax.local_devices()
    except (ImportError, RuntimeError) as e:
        log.warning(f"could not list JAX devices: {e}")
        return [f"- JAX devices: unavailable ({type(e).__name__})"]
    kinds = sorted({d.device_kind for d in devices})
    lines = [f"- JAX devices: {len(devices)}x {', '.join(kinds)}"]
    platform_name = devices[0].platform
    if platform_name == "cpu":
        return lines
    try:
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
    except (RuntimeError, NotImplementedError):
        limits = [None]
    if limits and all(limits):
        # memory_stats covers this host's devices only; other hosts are assumed alike
        total_bytes = sum(limits) / len(limits) * len(devices)
        lines.append(f"- Accelerator Memory: {total_bytes / 1024**3:.1f} GB total")
    if platform_name == "gpu":
        lines.append(f"- CUDA Version: {_cuda_version() or 'unknown'}")
    rate = hourly_rate(platform_name, kinds[0], len(devices))
    if rate:
        lines.append(f"- Hourly Rate: ${rate:.2f}/hour")
    return lines


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bloat_files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d not in _BLOAT_SKIP_DIRS and not d.endswith(".egg-info")
        )
        for name in sorted(filenames):
            path = Path(dirpath) / name
            # report.md in the root is generate's copy of its own output, not code
            if name.startswith(".") or path == root / "report.md":
                continue
            if path.suffix in _BLOAT_SUFFIXES and path.is_file():
                yield path


def bloat(root: Path = PROJECT_ROOT) -> dict[str, int]:
    """The code's weight, nanochat-style: characters, lines, files, tokens (~chars/4), uv.lock."""
    chars = lines = files = 0
    for path in _bloat_files(Path(root)):
        text = path.read_text(encoding="utf-8", errors="replace")
        chars += len(text)
        lines += text.count("\n") + (1 if text and not text.endswith("\n") else 0)
        files += 1
    lock = Path(root) / "uv.lock"
    lock_lines = len(lock.read_text(encoding="utf-8").splitlines()) if lock.exists() else 0
    return {
        "Characters": chars,
        "Lines": lines,
        "Files": files,
        "Tokens (approx)": chars // 4,
        "Dependencies (uv.lock lines)": lock_lines,
    }


def generate_header(project_root: Path = PROJECT_ROOT, now: datetime.datetime | None = None) -> str:
    """header.md: title, environment, software, bloat and the `Run started:` line."""
    generated = now or datetime.datetime.now()
    logical = os.cpu_count() or 0
    memory = _memory_gb()
    lines = [f"# {TITLE}", "", f"Generated: {generated:{_TIME_FORMAT}}", "", "## Environment", ""]
    lines += ["### Git Information", *_git_lines(project_root), ""]
    lines += [
        "### Hardware",
        f"- Platform: {platform.system()}",
        f"- CPUs: {_physical_cores() or logical} cores ({logical} logical)",
        f"- Memory: {'unknown' if memory is None else f'{memory:.1f} GB'}",
        *_accelerator_lines(),
        "",
        "### Software",
        f"- Python: {platform.python_version()}",
        *(f"- {label}: {_version(package)}" for label, package in _SOFTWARE),
        "",
        "### Bloat",
        *(f"- {key}: {value:,}" for key, value in bloat(project_root).items()),
        "",
    ]
    started = now or datetime.datetime.now()
    lines += [f"Run started: {started:{_TIME_FORMAT}}", "", "---", "", ""]
    return "\n".join(lines)


def reset(
    base_dir: str | Path | None = None,
    project_root: Path = PROJECT_ROOT,
    now: datetime.datetime | None = None,
) -> Path:
    """Delete the expected section files and report.md, write header.md; returns its path.

    Other files in the report dir are left alone: they are not ours to delete.
    """
    folder = report_dir(base_dir)
    for name in (*EXPECTED_SECTIONS, "report"):
        (folder / f"{name}.md").unlink(missing_ok=True)
    path = folder / "header.md"
    atomic_write_text(path, generate_header(project_root, now))
    return path


# ---------------------------------------------------------------------------------------------
# generate: the plots


@dataclass(frozen=True)
class _PanelSpec:
    title: str
    y_label: str
    keys: tuple[str, ...]  # metrics.jsonl keys; a `*` pattern adds every match, naturally sorted


_LOSS = _PanelSpec("Training loss", "loss (nats)", ("train/loss", "train/loss_smooth"))
_BPB = _PanelSpec("Validation bits per byte", "bpb", ("val/bpb",))
# phase (the runs/<tag>/<phase> folder the stage script writes) -> chart title, panels
_STAGE_PLOTS = (
    (
        "base",
        "Base model training",
        (
            _LOSS,
            _BPB,
            _PanelSpec("CORE metric", "CORE", ("core_metric",)),
            _PanelSpec("Model FLOPs utilization", "MFU (%)", ("train/mfu",)),
        ),
    ),
    ("mid", "Midtraining", (_LOSS, _BPB)),
    (
        "sft",
        "Chat SFT",
        (
            _PanelSpec("Loss", "loss (nats)", ("train/loss", "val/loss")),
            _PanelSpec("Chat metrics (validation)", "accuracy", ("val/*_acc",)),
        ),
    ),
    (
        "rl",
        "Chat RL",
        (
            _PanelSpec("Mean reward of the rollouts", "reward", ("train/reward",)),
            _PanelSpec("GSM8K pass@k (validation)", "pass@k", ("eval/pass@*",)),
        ),
    ),
)
_SERIES_LABELS = {
    "train/loss": "train loss",
    "train/loss_smooth": "train loss (EMA)",
    "val/bpb": "val bpb",
    "val/loss": "val loss",
    "core_metric": "CORE",
    "train/mfu": "MFU",
    "train/reward": "mean reward",
}
PLOTS_DIR = "plots"  # beside report.md in <base_dir>/report
COPY_PLOTS_DIR = "report_plots"  # beside the copy of report.md in the current directory


@dataclass(frozen=True)
class Plot:
    name: str  # file name in the plots folder
    alt: str
    svg: str


def read_metrics(path: str | Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} from a MetricsWriter metrics.jsonl, in step order.

    The writer appends, so a resumed (or restarted) run repeats steps. Within one process every
    key is logged at increasing steps and the file's steps never go down (TrainLoop writes step
    s's evaluation, then the train metrics of s, then s + 1's evaluation). A key going back to an
    earlier step s is therefore a new process that started at step s: what the file holds from
    step s on belongs to the abandoned timeline and is dropped, except the values at step s
    written since the old timeline's last later step (the new process's own, e.g. its val bpb
    at the step it resumed from, written before its first train loss). A repeat of the same step
    is overwritten: the last value wins. Torn or foreign lines are skipped. (Not
    metrics.read_jsonl: that module imports JAX, which generate avoids.)
    """
    series: dict[str, dict[int, tuple[int, float]]] = {}  # key -> step -> (line number, value)
    last: dict[str, int] = {}
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        values = {
            key: float(value)
            for key, value in record.items()
            if key not in ("step", "time")
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        }
        if any(key in last and step < last[key] for key in values):
            # the abandoned timeline's last line past this step: step-`step` values written
            # after it are the new process's
            boundary = max(
                written
                for points in series.values()
                for s, (written, _) in points.items()
                if s > step
            )
            for key, points in series.items():
                series[key] = {
                    s: point
                    for s, point in points.items()
                    if s < step or (s == step and point[0] > boundary)
                }
            last = {key: max(points) for key, points in series.items() if points}
        for key, value in values.items():
            series.setdefault(key, {})[step] = (number, value)
            last[key] = step
    return {
        key: {s: value for s, (_, value) in sorted(points.items())}
        for key, points in series.items()
        if points
    }


def _natural_key(text: str) -> list:
    """pass@2 before pass@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def stage_panels(phase: str, metrics: dict[str, dict[int, float]]) -> list[Panel]:
    """The chart panels of one stage that have data (none: the stage logged nothing we plot)."""
    specs = next((panels for name, _, panels in _STAGE_PLOTS if name == phase), None)
    if specs is None:
        known = ", ".join(name for name, _, _ in _STAGE_PLOTS)
        raise ValueError(f"no plots for phase {phase!r}; phases with plots: {known}")
    panels = []
    for spec in specs:
        keys = []
        for pattern in spec.keys:
            matches = sorted(fnmatch.filter(metrics, pattern), key=_natural_key)
            keys += [key for key in matches if key not in keys]
        series = tuple(
            Series(
                _SERIES_LABELS.get(key, key.split("/", 1)[-1]),
                list(metrics[key]),
                list(metrics[key].values()),
            )
            for key in keys
        )
        if series:
            panels.append(Panel(spec.title, spec.y_label, series))
    return panels


def _file_tag(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", tag)


def collect_plots(
    base_dir: str | Path, since: datetime.datetime | None = None, max_points: int = 2000
) -> list[Plot]:
    """One chart per stage of each model tag under <base_dir>/runs, base to RL, tags sorted.

    Stages whose metrics.jsonl was last written before `since` (the run's start) are left out:
    they are an earlier run's, still in a reused base dir.
    """
    runs = Path(base_dir) / "runs"
    plots = []
    for tag_dir in sorted(p for p in runs.glob("*") if p.is_dir()):
        for phase, title, _ in _STAGE_PLOTS:
            path = tag_dir / phase / "metrics.jsonl"
            if not path.is_file():
                continue
            if since is not None and path.stat().st_mtime < since.timestamp():
                log.info(f"{path} is older than the run's start, not plotted")
                continue
            try:
                panels = stage_panels(phase, read_metrics(path))
            except OSError as e:
                log.warning(f"could not read {path} ({e}), not plotted")
                continue
            if not panels:
                log.warning(f"{path} has no values to plot")
                continue
            chart_title = f"{title} ({tag_dir.name})"
            try:
                svg = render_svg(chart_title, panels, max_points=max_points)
            except (ValueError, ArithmeticError) as e:  # ArithmeticError: overflow, zero division
                # one odd metrics file must not cost the report its other charts
                log.warning(f"could not plot {path} ({type(e).__name__}: {e}), not plotted")
                continue
            plots.append(Plot(f"{_file_tag(tag_dir.name)}-{phase}.svg", chart_title, svg))
    return plots


def write_plots(plots: Sequence[Plot], folder: Path) -> None:
    """Each plot's SVG into `folder` (atomically); older SVGs there that are not in `plots` go."""
    names = {plot.name for plot in plots}
    if folder.is_dir():
        for stale in folder.glob("*.svg"):
            if stale.name not in names:
                stale.unlink()
    for plot in plots:
        atomic_write_text(folder / plot.name, plot.svg)


def plots_markdown(plots: Sequence[Plot], plots_dir: str = PLOTS_DIR) -> str:
    """The "Plots" section linking each chart by a relative path ("" when there are none)."""
    if not plots:
        return ""
    lines = [
        "## Plots",
        "",
        "From each stage's `runs/<tag>/<phase>/metrics.jsonl` (every scalar is also in "
        "TensorBoard: `tensorboard --logdir <base_dir>/runs`).",
        "",
    ]
    for plot in plots:
        lines += [f"![{plot.alt}]({plots_dir}/{plot.name})", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# generate: the report


def _timestamp(text: str, prefix: str) -> datetime.datetime | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return datetime.datetime.strptime(line[len(prefix) :].strip(), _TIME_FORMAT)
            except ValueError:
                return None
    return None


def _format_metric(value: str) -> str:
    try:
        return f"{float(value):.4f}"
    except ValueError:
        return value


def extract_metrics(section_text: str, names: Iterable[str]) -> dict[str, str]:
    """Values of `- NAME: value` (or `- NAME metric: value`) lines; the last one wins.

    Exact key matching, unlike nanochat's substring test, so that `- task_name: GSM8K` is not read
    as a GSM8K score and `ChatCORE metric` is not read as CORE.
    """
    wanted = {key: name for name in names for key in (name, f"{name} metric")}
    found = {}
    for line in section_text.splitlines():
        if not line.startswith("- ") or ":" not in line:
            continue
        key, value = line[2:].split(":", 1)
        if key.strip() in wanted:
            found[wanted[key.strip()]] = _format_metric(value.strip())
    return found


def metrics_table(metrics: dict[str, dict[str, str]]) -> str:
    """nanochat's fixed-width table; rows: CORE first, ChatCORE last, the rest alphabetical."""
    names = sorted(
        {name for column in metrics.values() for name in column},
        key=lambda name: (name != "CORE", name == "ChatCORE", name),
    )

    def row(cells: Iterable[str]) -> str:
        first, *rest = cells
        padded = [first.ljust(_METRIC_WIDTH), *(cell.ljust(_VALUE_WIDTH) for cell in rest)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "-" * (_METRIC_WIDTH + 2) + ("|" + "-" * (_VALUE_WIDTH + 2)) * len(_COLUMNS) + "|"
    lines = [row(["Metric", *_COLUMNS]), rule]
    lines += [row([name, *(metrics.get(c, {}).get(name, "-") for c in _COLUMNS)]) for name in names]
    return "\n".join(lines) + "\n"


def wall_clock(start: datetime.datetime, end: datetime.datetime) -> str:
    """`{h}h{m}m`, truncated to whole minutes (nanochat's format)."""
    seconds = int((end - start).total_seconds())
    return f"{seconds // 3600}h{seconds % 3600 // 60}m"


def _block(text: str, heading: str) -> str:
    """The lines under `heading` up to the next blank line."""
    found = re.search(rf"^{re.escape(heading)}\n(.*?)(?:\n\n|\n?\Z)", text, re.DOTALL | re.M)
    return found.group(1) if found else ""


def render_report(
    header: str | None,
    sections: dict[str, str],
    plots: Sequence[Plot] = (),
    plots_dir: str = PLOTS_DIR,
) -> str:
    """The whole report.md from header.md's text (None: missing), {slug: section text} and the
    charts (linked as `<plots_dir>/<name>`)."""
    parts = [header if header is not None else f"# {TITLE}\n\n"]
    metrics, end = {}, None
    for name in EXPECTED_SECTIONS:
        if name not in sections:
            continue
        text = sections[name]
        parts.append(text + "\n")
        if name not in _RL_SECTIONS:
            end = _timestamp(text, "timestamp:") or end
        if name in _SUMMARY_SOURCES:
            column, names = _SUMMARY_SOURCES[name]
            metrics[column] = extract_metrics(text, names)
    parts.append(plots_markdown(plots, plots_dir))
    parts.append("## Summary\n\n")
    bloat_lines = _block(header or "", "### Bloat")
    if bloat_lines:
        parts.append(bloat_lines + "\n\n")
    parts.append(metrics_table(metrics) + "\n")
    if header is not None:
        start = _timestamp(header, "Run started:")
        if start is None or end is None or end < start:
            parts.append("Total wall clock time: unknown\n")
        else:
            parts.append(f"Total wall clock time: {wall_clock(start, end)}\n")
            rate = re.search(r"^- Hourly Rate: \$([\d.]+)/hour", header, re.M)
            if rate:
                hours = (end - start).total_seconds() / 3600
                parts.append(
                    f"Estimated cost: ${float(rate.group(1)) * hours:.2f} "
                    f"(at ${float(rate.group(1)):.2f}/hour)\n"
                )
    return "".join(parts)


def generate(base_dir: str | Path | None = None, copy_to: str | Path | None = None) -> Path:
    """Write <base_dir>/report/report.md and its plots/ (atomically); also into folder `copy_to`
    if given (the plots in `copy_to`/report_plots/)."""
    folder = report_dir(base_dir)
    header_path = folder / "header.md"
    header = header_path.read_text(encoding="utf-8") if header_path.exists() else None
    if header is None:
        log.warning(
            f"{header_path} does not exist: no environment, bloat or wall-clock time in the "
            "report (run `python -m nanochat_jax.report reset` at the start of a run)"
        )
    sections = {}
    for name in EXPECTED_SECTIONS:
        path = folder / f"{name}.md"
        if path.exists():
            sections[name] = path.read_text(encoding="utf-8")
        else:
            log.warning(f"{path} does not exist, skipping")
    known = {*EXPECTED_SECTIONS, "header", "report"}
    for path in sorted(folder.glob("*.md")):
        if path.stem not in known:
            log.warning(f"{path} is not a section of the pipeline, left out of the report")
    if header is None and not sections:
        raise FileNotFoundError(
            f"nothing to report in {folder}: no header.md and no stage sections (run "
            "`python -m nanochat_jax.report reset` at the start of a run, then the stages)"
        )
    since = _timestamp(header, "Run started:") if header is not None else None
    plots = collect_plots(folder.parent, since)
    # the charts first: report.md never links to a file that is not there yet
    write_plots(plots, folder / PLOTS_DIR)
    text = render_report(header, sections, plots)
    out = folder / "report.md"
    atomic_write_text(out, text)
    print(
        f"Wrote the report to {out}" + (f" and {len(plots)} plots to {PLOTS_DIR}/" if plots else "")
    )
    if copy_to is not None:
        copy = Path(copy_to) / "report.md"
        if copy.resolve() != out.resolve():
            write_plots(plots, Path(copy_to) / COPY_PLOTS_DIR)
            atomic_write_text(copy, render_report(header, sections, plots, COPY_PLOTS_DIR))
            print(f"Copied it to {copy.resolve()} (overwritten if there was one)")
    print(text[text.rindex("## Summary") :], end="")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat_jax.report",
        description="Reset (start of a run) or generate (end of a run) the training report card.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="generate",
        choices=["reset", "generate"],
        help="reset: clear the sections, write header.md; generate: write report.md (default)",
    )
    parser.add_argument(
        "--no-copy", action="store_true", help="generate: do not copy report.md into the cwd"
    )
    args = parser.parse_args(argv)
    if args.command == "reset":
        # The header only looks at the accelerators: do not grab 75% of their memory, and let
        # memory_stats' bytes_limit be the whole device rather than JAX's default fraction.
        # (XLA's allocator limit is total memory x this fraction.)
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "1.0"
        path = reset()
        print(f"Reset the report and wrote its header to {path}")
    else:
        try:
            generate(copy_to=None if args.no_copy else Path.cwd())
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
