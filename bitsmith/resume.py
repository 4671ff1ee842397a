"""Continuing a killed `bitsmith quantize` (`--resume`). The unfinished folder is continued only by a run with
the same identity (bitsmith version, model, options, calibration windows, --target-bpw, --lossless-rest),
recorded first in its journal, and then the same plan; anything else is refused with the first difference
named, and the folder is kept as it was. The measurement of a --target-bpw run is saved into the folder as
soon as it is made, so that a resumed run does not measure again."""
from __future__ import annotations

import contextlib
import json

from .distributed import SOLO, World, broadcast_from_main
from .formats import faults
from .formats.errors import InputError
from .formats.output import ResumeRefused
from .measure import Measurement, measure
from .plan import QuantizeOptions, QuantPlan

MEASUREMENT = "measurement.json"


def identity(version: str, model: str, opts: QuantizeOptions, calibration: str, target_bpw: float | None,
             lossless_rest: bool) -> dict:
    """What a run continuing this one must share with it (`model` and `calibration`: sha256 fingerprints)."""
    return _json({"version": version, "model": model, "options": opts.as_dict(), "calibration": calibration,
                  "target_bpw": target_bpw, "lossless_rest": lossless_rest})


@contextlib.contextmanager
def refusing(writer):
    """While this run's identity is established: in a continued folder, bad input refuses to resume (the
    folder is kept for a run with the right inputs) rather than failing the run (which deletes it)."""
    try:
        yield
    except InputError as e:
        if not writer.resumed or isinstance(e, ResumeRefused):
            raise
        raise ResumeRefused(str(e)) from None


def take_up(writer, current: dict, out) -> None:
    """Record the identity in a fresh folder's journal; in a continued one, refuse unless it is the same."""
    recorded = next((entry["identity"] for entry in writer.resumed if "identity" in entry), None)
    if recorded is None:
        writer.record({"identity": current})
        return
    difference = _difference(recorded, current)
    if difference:
        raise ResumeRefused(f"{out}: cannot resume: {difference} (run without --resume to start over)")


def _difference(recorded: dict, current: dict) -> str | None:
    """The first difference between the interrupted run's identity and this run's, in words."""
    if recorded.get("version") != current["version"]:
        return f"the interrupted run was made by bitsmith {recorded.get('version')}, this is {current['version']}"
    if recorded.get("model") != current["model"]:
        return "the model differs from the interrupted run's (sha256 of its files)"
    old_options = recorded.get("options", {})
    for key, value in current["options"].items():
        if old_options.get(key) != value:
            return _changed(key, value, old_options.get(key))
    if recorded.get("calibration") != current["calibration"]:
        return "the calibration text differs from the interrupted run's (sha256 of the calibration windows)"
    for key in ("target_bpw", "lossless_rest"):
        if recorded.get(key) != current[key]:
            return _changed(key, current[key], recorded.get(key))
    return None


def _changed(key: str, value, old) -> str:
    flag = "--" + key.replace("_", "-")
    return f"this run has {_stated(flag, value)}, the interrupted one had {_stated(flag, old)}"


def _stated(flag: str, value) -> str:
    """An option as given: `--seed 1`, `--sym`, `no --target-bpw`."""
    if value is None or value is False:
        return f"no {flag}"
    if value is True:
        return flag
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def check_plan(writer, plan: QuantPlan, out) -> None:
    """Record the plan in a fresh folder's journal; in a continued one, refuse unless it is the same."""
    current = _json(plan.as_dict())
    recorded = next((entry["plan"] for entry in writer.resumed if "plan" in entry), None)
    if recorded is None:
        writer.record({"plan": current})
    elif recorded != current:
        raise ResumeRefused(f"{out}: cannot resume: the plan differs from the interrupted run's (run without "
                            "--resume to start over)")


def measurement(writer, source, opts: QuantizeOptions, path: str | None, progress: bool,
                world: World = SOLO, calib=None) -> Measurement | None:
    """The measurement to plan from: read from `path` when given, else the one saved in the folder, else
    measured (on `calib`, the run's (windows, description), when given); saved into the folder (as the
    checkpoint's measurement.json) once made. In a parallel run main holds the folder: every process takes part
    in measuring, and only main gets a measurement read from a file (the others None)."""
    saved = writer.saved(MEASUREMENT) if world.main else None
    if broadcast_from_main(path is None and saved is None, world):
        faults.point("measure")
        measured = measure(source, opts, progress and world.main, world, calib)
        faults.point("measured")
    elif not world.main:
        return None
    elif path is None:
        return Measurement.load(str(saved), source, opts)
    else:
        measured = Measurement.load(path, source, opts)
    if world.main and saved is None:
        writer.save_file(MEASUREMENT, (json.dumps(measured.as_dict(), indent=1) + "\n").encode())
    return measured


def blocks_done(writer) -> int:
    return sum("block" in entry for entry in writer.resumed)


def _json(value):
    """`value` as it reads back from the journal (tuples become lists)."""
    return json.loads(json.dumps(value))
