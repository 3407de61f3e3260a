"""Where a run's figures go besides ``RUN/log.jsonl``: TensorBoard, a timm-like
``RUN/summary.csv``, Weights & Biases and MLflow, chosen by name (``log_to``).

Each tracker is a small class behind one interface (``Tracker``): it opens with the run's
resolved settings and records them once (TensorBoard's text panel, W&B's config, MLflow's
params), takes the figures of each ``train``, ``val`` and ``probe`` record at its step
(``log``), and closes. The figures keep ``log.jsonl``'s names (``loss``, ``val_top1``); the
charts show them by group (``tag``: ``train/loss``, ``val/top1``, ``probe/top1``).

W&B and MLflow are optional extras, imported only when named (``require``). They take their
own environment as usual (``WANDB_MODE``, ``WANDB_PROJECT``, ``WANDB_DIR``;
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``); the project and the experiment are
``beit-data`` unless it names one. A run records their run ids in ``RUN/trackers.json``, so a
resumed run logs on into the same W&B run and MLflow run.

On a resume, ``log.jsonl``, TensorBoard (its ``purge_step``) and ``summary.csv`` drop what an
interrupted run logged after its last checkpoint, so no step appears twice. W&B and MLflow keep
what they were sent: the resumed run sends the steps after the checkpoint again, and as a resume
is exact they show those steps twice at the same values (W&B's charts run on ``step``, not on
W&B's own counter, which only grows).

Only rank 0 tracks. A tracker that cannot reach its server in the middle of a run says so once
and the run goes on (``log.jsonl`` has every figure); one that cannot start stops the run before
it trains, in one line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from beit_common import BeitDataError, redact, write_text_atomic

__all__ = ["Tracker", "require", "open_trackers", "tag", "TensorBoard", "CsvSummary", "WandB", "MLflow",
           "SUMMARY", "RUN_IDS", "recorded_run_id"]

SUMMARY = "summary.csv"
RUN_IDS = "trackers.json"  # the W&B and MLflow run ids of a run, for its resumes
PROJECT = "beit-data"  # the W&B project and the MLflow experiment, unless their environment names one
EXTRAS = ("wandb", "mlflow")  # trackers that are optional extras: the package's name is the extra's


class Tracker(Protocol):
    """A destination of a run's figures; it records the run's settings when it opens."""

    def log(self, step: int, figures: dict[str, float]) -> None:
        """The figures of one record (``log.jsonl``'s names), at its step."""

    def close(self, failed: bool = False) -> None:
        """Flush and close; ``failed``: the run ends with an error."""


def tag(name: str) -> str:
    """A figure's name on a chart: ``val_top1`` is ``val/top1``, ``probe_top1`` is
    ``probe/top1``, a training figure ``loss`` is ``train/loss``."""
    group, _, rest = name.partition("_")
    return f"{group}/{rest}" if group in ("val", "probe") and rest else f"train/{name}"


def _import(name: str):
    """The optional package of tracker ``name``, or one line that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name == name:
            raise BeitDataError(f"`log_to` {name}: the {name} package is not installed; "
                                f"pip install 'beit-data[{name}]'") from None
        raise BeitDataError(f"`log_to` {name}: cannot import {name} ({exc}); "
                            f"pip install 'beit-data[{name}]'") from None


def require(names: tuple[str, ...]) -> None:
    """Import the optional packages that ``names`` asks for, before the run builds anything
    (on every rank: they fail together, none waits on a rank that stopped)."""
    for name in names:
        if name in EXTRAS:
            _import(name)


def open_trackers(names: tuple[str, ...], out: Path, config: dict, resumed_at: int) -> list[Tracker]:
    """The trackers ``names``, opened on the run folder ``out``, each with the run's settings.

    Args:
        config: The resolved settings, as ``config.json`` holds them (redacted).
        resumed_at: The checkpoint's step when the run resumes, 0 for a new run.
    """
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
                except ImportError:  # tensorboard is a dependency, but a bare GPU image may lack it
                    warnings.warn("tensorboard is not installed; not logging to TensorBoard", stacklevel=2)
                    continue
            opened.append(KINDS[name](out, config, resumed_at))
    except BaseException:
        for tracker in opened:
            tracker.close(failed=True)
        raise
    return opened


def say(text: str) -> None:
    """A line on stderr above the progress bar."""
    tqdm.write(f"pretrain: {text}", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    return redact((str(exc).strip().splitlines() or [type(exc).__name__])[0])


def run_name(config: dict) -> str | None:
    """The run's name in W&B and MLflow: its folder's (``--out``'s last part)."""
    return str(config.get("out", "")).rstrip("/").rsplit("/", 1)[-1] or None


def recorded_run_id(out: Path, tracker: str) -> str | None:
    """The id of the ``tracker`` run that run folder ``out`` logged to (``RUN/trackers.json``)."""
    path = out / RUN_IDS
    try:
        return json.loads(path.read_text()).get(tracker) if path.exists() else None
    except (ValueError, AttributeError):  # not the JSON object this module writes: no id
        return None


def record_run_id(out: Path, tracker: str, run_id: str) -> None:
    path = out / RUN_IDS
    ids = json.loads(path.read_text()) if path.exists() else {}
    write_text_atomic(path, json.dumps({**(ids if isinstance(ids, dict) else {}), tracker: run_id}, indent=1))


# ---- the trackers ----


class TensorBoard:
    """``RUN/tb``: a scalar a figure under its ``tag``, the settings in the text panel ``config``.
    A resumed run purges the events logged after its checkpoint."""

    def __init__(self, out: Path, config: dict, resumed_at: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tb"), purge_step=resumed_at + 1)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", resumed_at)

    def log(self, step: int, figures: dict[str, float]) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(tag(name), value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class CsvSummary:
    """``RUN/summary.csv``, as timm's ``update_summary`` writes it: a header, then a row a logged
    step with its figures as columns under ``log.jsonl``'s names (``step``, ``epoch``, ``loss``,
    ``acc``, ``lr``, ..., ``val_top1``, ``probe_top1``), the same numbers in the same text. A
    step's held-out and probe figures join its row.

    Rows are appended as they come (a step's later figures rewrite its row, the file's last), so
    the file is as current as ``log.jsonl``. The header is written again (the file with it,
    atomically) only when a column first appears: the held-out figures of step 0 come before
    the training figures, and a resumed run may log more (a new ``val_shards``, fp16's
    ``loss_scale``). A resumed run drops the rows after its checkpoint, and a row a kill cut off.
    """

    def __init__(self, out: Path, config: dict, resumed_at: int):
        self.path, self.file = out / SUMMARY, None
        columns, rows = _read_csv(self.path)
        self._write_all(columns, [row for row in rows if int(row["step"]) <= resumed_at])

    def log(self, step: int, figures: dict[str, float]) -> None:
        row = {"step": step, **figures}
        if self.last is not None and self.last[0] == step:  # more figures of the last row's step
            at, row = self.last[1], {**self.last[2], **row}
            self.file.truncate(at)
            self.file.seek(at)
        else:
            at = self.file.seek(0, os.SEEK_END)
        if not set(row) <= set(self.columns):
            self._write_all(self.columns + [k for k in row if k not in self.columns], _read_csv(self.path)[1] + [row])
            return
        self.file.write(_csv_line(self.columns, row).encode())
        self.file.flush()
        self.last = (step, at, row)

    def _write_all(self, columns: list[str], rows: list[dict]) -> None:
        """Write the file anew, atomically: the header of ``columns`` (in ``_column_order``) and ``rows``."""
        self.columns = sorted(columns, key=lambda c: (_column_order(c), columns.index(c)))
        lines = [_csv_line(self.columns, {c: c for c in self.columns})] if self.columns else []
        lines += [_csv_line(self.columns, row) for row in rows]
        write_text_atomic(self.path, "".join(lines))
        if self.file is not None:
            self.file.close()
        self.file = self.path.open("ab")
        end = len("".join(lines).encode())
        self.last = (int(rows[-1]["step"]), end - len(lines[-1].encode()), rows[-1]) if rows else None

    def close(self, failed: bool = False) -> None:
        self.file.close()


def _column_order(name: str) -> int:
    """step, epoch, the training figures, the held-out figures, the probe's."""
    return {"step": 0, "epoch": 1}.get(name, 3 if name.startswith("val_") else 4 if name.startswith("probe_") else 2)


def _csv_line(columns: list[str], row: dict) -> str:
    # Figures are numbers (and names have no comma): no quoting. str() of a float round-trips, as
    # json.dumps in log.jsonl writes it.
    return ",".join("" if row.get(c) is None else str(row[c]) for c in columns) + "\n"


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """The columns and rows (values as written, in text) of a summary; a last line without its
    newline, cut off by a kill, is left out."""
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    if not lines:
        return [], []
    columns = lines[0].split(",")
    return columns, [{c: v for c, v in zip(columns, line.split(",")) if v != ""} for line in lines[1:]]


class WandB:
    """A Weights & Biases run: the settings as its config, each figure under its ``tag`` against
    ``step`` (``define_metric``). A resumed run logs on into the run of ``RUN/trackers.json``."""

    def __init__(self, out: Path, config: dict, resumed_at: int):
        wandb = _import("wandb")
        recorded = recorded_run_id(out, "wandb") if resumed_at else None
        try:
            with redacted_argv():  # W&B records the command line, a pipe: command's secret and all
                self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name(config),
                                      id=recorded, resume="allow" if recorded else None)
            self.run.config.update(config, allow_val_change=True)  # a resumed run may change some
            self.run.define_metric("step")
            for group in ("train", "val", "probe"):
                self.run.define_metric(f"{group}/*", step_metric="step")
        except Exception as exc:  # wandb raises many kinds: a bad key, no network online, ...
            raise BeitDataError(f"`log_to` wandb: {_first_line(exc)}") from None
        record_run_id(out, "wandb", self.run.id)
        self.warned = False

    def log(self, step: int, figures: dict[str, float]) -> None:
        try:
            self.run.log({"step": step, **{tag(name): value for name, value in figures.items()}})
        except Exception as exc:
            self.warned = self.warned or _warn("wandb", exc)

    def close(self, failed: bool = False) -> None:
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as exc:
            _warn("wandb", exc)


@contextmanager
def redacted_argv():
    """``sys.argv`` with every credential redacted (``redact``) while W&B starts a run and reads it."""
    argv = sys.argv
    sys.argv = [redact(arg) for arg in argv]
    try:
        yield
    finally:
        sys.argv = argv


class MLflow:
    """An MLflow run in the experiment ``MLFLOW_EXPERIMENT_NAME`` (else ``beit-data``) of the
    tracking store ``MLFLOW_TRACKING_URI``: the settings as params (text; JSON for what is not
    text), each figure as a metric under its ``tag`` at its step. A resumed run logs on into the
    run of ``RUN/trackers.json``; MLflow keeps a param's first value, so a setting the resume
    changed keeps it there (``config.json`` has the new one)."""

    def __init__(self, out: Path, config: dict, resumed_at: int):
        mlflow = _import("mlflow")
        from mlflow.tracking import MlflowClient

        uri = redact(mlflow.get_tracking_uri())
        try:
            self.client = MlflowClient()
            self.run_id, logged = self._run(out, config, resumed_at, uri)
            params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items() if k not in logged}
            self._log_batch(params=params)
        except BeitDataError:
            raise
        except Exception as exc:  # MlflowException, or the server's connection error
            raise BeitDataError(f"`log_to` mlflow: {_first_line(exc)} (tracking URI {uri}; "
                                "MLFLOW_TRACKING_URI sets it)") from None
        record_run_id(out, "mlflow", self.run_id)
        self.warned = False

    def _run(self, out: Path, config: dict, resumed_at: int, uri: str) -> tuple[str, dict]:
        """The id of the run to log to, and the params it holds: the recorded one for a resumed run
        where the store has it, else a new one."""
        from mlflow.exceptions import MlflowException

        recorded = recorded_run_id(out, "mlflow") if resumed_at else None
        if recorded:
            try:
                run = self.client.get_run(recorded)
            except MlflowException:
                say(f"mlflow: the run {recorded} of {RUN_IDS} is not in the tracking store {uri}; logging to a new "
                    "MLflow run")
            else:
                self.client.update_run(recorded, status="RUNNING")
                return recorded, run.data.params
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        return self.client.create_run(experiment_id, run_name=run_name(config)).info.run_id, {}

    def _log_batch(self, params: dict | None = None, step: int = 0, figures: dict | None = None) -> None:
        from mlflow.entities import Metric, Param

        params = [Param(k, v) for k, v in (params or {}).items()]
        now = int(time.time() * 1000)
        metrics = [Metric(tag(k), float(v), now, step) for k, v in (figures or {}).items()]
        for start in range(0, max(len(params), len(metrics)), 100):  # log_batch takes 100 params at most
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 100], params=params[start:start + 100])

    def log(self, step: int, figures: dict[str, float]) -> None:
        try:
            self._log_batch(step=step, figures=figures)
        except Exception as exc:
            self.warned = self.warned or _warn("mlflow", exc)

    def close(self, failed: bool = False) -> None:
        try:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        except Exception as exc:
            _warn("mlflow", exc)


def _warn(tracker: str, exc: BaseException) -> bool:
    """Say once that a tracker failed in the middle of a run, which goes on."""
    say(f"warning: {tracker}: {_first_line(exc)}; the run goes on, log.jsonl keeps every figure")
    return True


KINDS = {"tensorboard": TensorBoard, "csv": CsvSummary, "wandb": WandB, "mlflow": MLflow}
