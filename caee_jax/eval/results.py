"""The results file of a sweep (`launch/eval.py`): one JSON record per case, each with its provenance.

A rerun resumes: cases already in the file are skipped. That is only sound when the file's records were
measured on what this run would measure, so every record carries its provenance (model, evaluation text,
window sizes, dtype, experts' storage, offload setup, mesh, cost table, code version) and `check` refuses a
run that differs:
  EXPERIMENT fields must be equal across the whole file (records of another model, text or code are not
    comparable with this run's);
  PER_CASE fields may differ between cases (batch 1 on fewer tokens, another mesh and its cost table), but a
    case already in the file must have been measured with this run's values (else the table would show two
    measurements of one case, or the old one only).
The file is appended to one fsynced line per case, so a killed run leaves at most a torn last line:
`read` reports it and cuts it off (atomically); any other line that is not a record is an error naming it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess

from caee_jax.files import atomic_write

# Recorded per case, and part of what identifies it (target, slack, refill, expert_importance,
# layer_sensitivity, cost_exponent, per_expert: CAEE's; expert_means, importance: the calibration files)
SETTINGS = (
    "compensation", "k_min", "target", "slack", "refill", "expert_importance", "layer_sensitivity",
    "cost_exponent", "per_expert", "expert_means", "importance", "decision_scope",
)  # fmt: skip
CASE = ("rule", "knob", "batch_size", "processes", *SETTINGS, "eplb")  # eplb: the placement of EPLB cases, else None
EXPERIMENT = ("model_fingerprint", "eval_sha256", "prefix", "steps", "dtype", "weights", "offload", "code")
PER_CASE = ("eval_tokens", "mesh", "slowed", "cost_table_sha256", "expert_means_sha256", "importance_sha256")
CONTENT_HASH_LIMIT = 256 << 20  # model files up to this size are hashed; larger ones by size and mtime


class ResultsError(ValueError):
    """A results file that this run cannot resume: unreadable, or measured on something else."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | None, preset_config=None) -> str:
    """What identifies the evaluated model: a preset's config (random weights, seed 0), or a checkpoint
    directory's files (their content; a file above CONTENT_HASH_LIMIT by size and mtime, to stay fast)."""
    digest = hashlib.sha256()
    if preset_config is not None:
        digest.update(repr(dataclasses.asdict(preset_config)).encode())
        return digest.hexdigest()[:16]
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if size <= CONTENT_HASH_LIMIT:
                identity = sha256_file(path)
            else:
                identity = f"{size}:{os.stat(path).st_mtime_ns}"
            digest.update(f"{os.path.relpath(path, model_dir)}={identity}\n".encode())
    return digest.hexdigest()[:16]


def code_version() -> str:
    """The caee_jax code that measured: its git commit (+dirty with uncommitted changes to the code),
    else the installed package version."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = ["git", "-C", root]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = [*git, "status", "--porcelain", "--untracked-files=no", "--", "caee_jax", "launch"]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"git {commit.stdout.strip()}" + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            return f"caee_jax {importlib.metadata.version('caee_jax')}"
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


def table_fingerprint(table) -> str | None:
    """A cost table's identity: the hash of its content (None: no table)."""
    if table is None:
        return None
    return hashlib.sha256(json.dumps(table.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def offload_provenance(manager) -> dict | None:
    """An offloaded model's cache setup (`offload.cache.CacheManager`; None: every expert on the device): the
    store's tier (and a disk store's content fingerprint), slots per MoE layer, eviction policy, prefetch."""
    if manager is None:
        return None
    return dict(
        store=manager.store.tier,
        store_fingerprint=getattr(manager.store, "fingerprint", None),
        slots=manager.slots,
        policy=str(manager.policy),
        prefetch=manager.prefetch,
    )


def provenance(
    *,
    model,
    model_dir,
    preset_config,
    eval_file,
    eval_bytes,
    window,
    mesh,
    cost_table,
    table,
    expert_means,
    offload,
    importance=None,
    slowed=None,
) -> dict:
    """What a run measures on: `model` (a label) with the identity of `model_dir` or `preset_config`; the
    evaluation text; `window` (eval_tokens, prefix, steps, dtype, weights: the routed experts' storage when
    not held in dtype, else None); the mesh, and `slowed`, its process slowed on purpose ("ID:FACTOR",
    `parallel/straggler.py`; None: none); the cost table (its path and
    content `table`); the calibration files (expert means, CAEE importance: path and SHA-256); `offload`
    (`offload_provenance`); the code."""
    return dict(
        model=model,
        model_fingerprint=model_fingerprint(model_dir, preset_config),
        eval_file=os.path.abspath(eval_file),
        eval_sha256=hashlib.sha256(eval_bytes).hexdigest(),
        **window,
        mesh=mesh,
        slowed=slowed,
        cost_table=cost_table and os.path.abspath(cost_table),
        cost_table_sha256=table_fingerprint(table),
        expert_means_sha256=expert_means and sha256_file(expert_means),
        calibration_files={
            name: dict(path=os.path.abspath(file), sha256=sha256_file(file))
            for name, file in (("expert_means", expert_means), ("importance", importance))
            if file
        },
        importance_sha256=importance and sha256_file(importance),
        offload=offload,
        code=code_version(),
    )


def key(record: dict) -> tuple:
    """What identifies a measured case: the case and its provenance."""
    provenance = record.get("provenance") or {}
    fields = (provenance.get(f) for f in (*EXPERIMENT, *PER_CASE))
    return tuple(record.get(name) for name in CASE) + tuple(
        json.dumps(value, sort_keys=True) if isinstance(value, dict) else value for value in fields
    )


def read(path: str, repair: bool) -> tuple[list[dict], str | None]:
    """The records of `path` ([] if absent) and a note when a torn last line (an interrupted append) was
    dropped; `repair` also cuts it off the file, atomically, so the next append starts a fresh line.
    A line that is not a record anywhere else raises ResultsError naming path:line."""
    if not os.path.exists(path):
        return [], None
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    tail = lines.pop()  # after the last newline: b"" unless the last append was cut short
    records = [_record(path, number, line) for number, line in enumerate(lines, start=1)]
    if not tail:
        return records, None
    try:
        records.append(_record(path, len(lines) + 1, tail))
        note = None
    except ResultsError:
        note = f"{path}:{len(lines) + 1}: dropped a torn last line (an interrupted run)"
    if repair:
        with atomic_write(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return records, note


def _record(path: str, number: int, line: bytes) -> dict:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"{path}:{number}: not a JSON record ({error}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise ResultsError(f"{path}:{number}: not a JSON record (a {type(record).__name__}); fix or remove the line")
    return record


def check(path: str, records: list[dict], provenance: dict, cases: list[dict]) -> None:
    """Raises ResultsError naming path:line and the field when a record was measured on something this run
    does not measure (see the module doc); `cases`: this run's case identities (the CASE fields)."""
    wanted = {tuple(case[name] for name in CASE) for case in cases}
    for number, record in enumerate(records, start=1):
        held = record.get("provenance")
        if not isinstance(held, dict):
            raise ResultsError(f"{path}:{number}: a record without provenance (an older eval.py); {_ADVICE}")
        fields = EXPERIMENT
        if tuple(record.get(name) for name in CASE) in wanted:
            fields += PER_CASE
        for field in fields:
            if held.get(field) != provenance[field]:
                raise ResultsError(
                    f"{path}:{number}: measured with {field} {held.get(field)!r}, this run has "
                    f"{provenance[field]!r}; {_ADVICE}"
                )


_ADVICE = "rerun with --fresh to move the old results aside, or choose another --out"


def move_aside(path: str) -> str | None:
    """Renames an existing results file to a dated name beside it (never deletes it); the new name or None."""
    if not os.path.exists(path):
        return None
    stem, ext = os.path.splitext(path)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    aside = f"{stem}.{stamp}{ext}"
    number = 1
    while os.path.exists(aside):
        aside, number = f"{stem}.{stamp}-{number}{ext}", number + 1
    os.replace(path, aside)
    return aside


def append(path: str, record: dict) -> None:
    """One line per case, flushed and fsynced: a killed run loses at most the case in progress."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
