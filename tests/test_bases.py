"""The base store: one weights variant of a base is fetched, hashed and copied (a Stable Diffusion 1.x hub
repository holds three), and `tav-export --gc` removes the engine and base store entries nothing refers to."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import hub_cache_repository
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from exporter.cli import main as export_main
from exporter.gc import DEFAULT_GRACE, collect
from jobs.bases import parse_base
from tuner.base_store import base_in_use
from tuner.components import (
    WEIGHT_NAMES,
    BaseModelError,
    base_model_files,
    base_model_hash,
    is_same_base,
    load_components,
    model_file_patterns,
    weights_file,
)
from tuner.hub import resolve_base
from tuner.io_utils import sha256_files
from tuner.threads import OPENMP, cpu_budget

# The files of runwayml/stable-diffusion-v1-5 (revision 39593d5; the tree the diffusers docs' "loading" page shows,
# and the root checkpoints of the repository's file list). CompVis/stable-diffusion-v1-4 has the same diffusers
# folders, with sd-v1-4.ckpt / sd-v1-4-full-ema.ckpt at its root.
SD15_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v1-inference.yaml",
    "v1-5-pruned-emaonly.ckpt", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.fp16.safetensors", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors",
]
CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "tokenizer/merges.txt",
           "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
           "unet/config.json", "vae/config.json"]


@pytest.mark.parametrize("variant, weights", [
    (None, ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors"]),
    ("fp16", ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
              "vae/diffusion_pytorch_model.fp16.safetensors"]),
])
def test_the_hub_fetch_takes_one_weights_variant_of_a_stable_diffusion_repository(variant, weights):
    """What `snapshot_download` fetches of the real SD 1.5 file list: the configs and one variant's weights; no
    other variant (fp16, non_ema), no pickle, no root checkpoint, no safety checker or feature extractor."""
    fetched = sorted(filter_repo_objects(SD15_FILES, allow_patterns=model_file_patterns(variant)))
    assert fetched == sorted(CONFIGS + weights)


def with_every_variant(tiny: Path, where: Path) -> Path:
    """The tiny base laid out as an SD 1.x hub repository is: fp16 and non_ema safetensors beside the main
    weights, pickled copies, a safety checker and a feature extractor."""
    shutil.copytree(tiny, where)
    for part in WEIGHT_NAMES:
        main = load_file(where / weights_file(part, None))
        save_file({k: v.half() for k, v in main.items()}, where / weights_file(part, "fp16"))
        (where / part / f"{WEIGHT_NAMES[part]}.bin").write_bytes(b"pickled")
    unet = load_file(where / weights_file("unet", None))
    save_file({k: v + 0.01 for k, v in unet.items()}, where / weights_file("unet", "non_ema"))
    for name in ("safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors",
                 "feature_extractor/preprocessor_config.json", "v1-5-pruned.ckpt"):
        (where / name).parent.mkdir(exist_ok=True)
        (where / name).write_bytes(b"never loaded")
    return where


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def loaded_files(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base_model_files(base))


def test_a_local_base_with_every_variant_hashes_and_copies_one(tiny_base, tmp_path):
    """A directory holding every variant: the main weights by default (the same hash as the base without the
    other variants), `@fp16` the fp16 files alone; each store copy holds just its variant and loads as it."""
    base = with_every_variant(tiny_base, tmp_path / "sd")
    repo = tmp_path / "repo"

    with base_in_use(*resolve_base(str(base)), repo) as main:
        pass
    assert main.name == base_model_hash(tiny_base)
    assert files(main) == loaded_files(tiny_base)

    with base_in_use(*resolve_base(f"{base}@fp16"), repo) as fp16:
        pass
    assert fp16.name == base_model_hash(base, "fp16") != main.name
    assert files(fp16) == sorted(p.replace(".safetensors", ".fp16.safetensors") if p.endswith(".safetensors") else p
                                 for p in loaded_files(tiny_base))
    assert [p.name for p in base_model_files(fp16)] == [p.name for p in base_model_files(base, "fp16")]
    unet = load_components(fp16).unet  # diffusers' variant="fp16", found in the copy
    stored = load_file(base / weights_file("unet", "fp16"))
    name, tensor = next(iter(unet.state_dict().items()))
    assert torch.equal(tensor, stored[name].float())
    assert sorted(p.name for p in (repo / ".bases").iterdir() if not p.name.startswith(".")) == sorted(
        [main.name, fp16.name])
    # a model tuned before recorded a hash over every variant's weights: it still names this base
    every_variant = [base / f for f in files(base) if f in CONFIGS or f.split("/")[0] in WEIGHT_NAMES
                     and f.endswith(".safetensors")]
    assert is_same_base(base, sha256_files(every_variant, base))


def test_a_hub_cache_with_every_variant_gives_one(tiny_base, tmp_path):
    """A hub id, offline, from a huggingface_hub cache on disk (blobs, snapshot links, refs) holding every
    variant: each of `ID` and `ID@fp16` is hashed and copied as its one variant."""
    layout = with_every_variant(tiny_base, tmp_path / "layout")
    cache = tmp_path / "hub"
    hub_cache_repository(cache, "tav-test/sd", layout)
    code = """
import json, sys
from pathlib import Path
from tuner.base_store import base_in_use
from tuner.hub import resolve_base
copies = {}
for source in ("tav-test/sd", "tav-test/sd@fp16"):
    with base_in_use(*resolve_base(source), Path(sys.argv[1])) as copy:
        copies[source] = str(copy)
print(json.dumps(copies))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "repo")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    copies = {source: Path(path) for source, path in json.loads(result.stdout).items()}
    assert files(copies["tav-test/sd"]) == loaded_files(tiny_base)
    assert copies["tav-test/sd"].name == base_model_hash(tiny_base)
    assert [f for f in files(copies["tav-test/sd@fp16"]) if f.endswith(".safetensors")] == sorted(
        weights_file(part, "fp16") for part in WEIGHT_NAMES)


def test_the_main_weights_are_the_default_never_a_variant_in_their_place(tiny_base, tmp_path):
    """A source holding only fp16 weights is refused without `@fp16`, naming what to give; with it, it resolves."""
    base = with_every_variant(tiny_base, tmp_path / "sd")
    for part in WEIGHT_NAMES:
        (base / weights_file(part, None)).unlink()
        (base / weights_file(part, "non_ema")).unlink(missing_ok=True)
    with pytest.raises(BaseModelError, match=f"only the fp16 variant: give it as {base}@fp16"):
        resolve_base(str(base))
    assert resolve_base(f"{base}@fp16") == (base, "fp16")


@pytest.mark.parametrize("arg", ["sd=org/model@", "sd=org/model@fp-16", "sd=@fp16"])
def test_a_malformed_variant_is_refused_naming_the_flag(arg):
    with pytest.raises(ValueError, match="--base"):
        parse_base(arg)


def store_entry(repo: Path, store: str, name: str, age: float = 7200.0) -> Path:
    """A store entry with a file in it, last changed `age` seconds ago."""
    entry = repo / store / name
    entry.mkdir(parents=True)
    (entry / "weights.bin").write_bytes(b"\0" * 1024)
    then = time.time() - age
    os.utime(entry, (then, then))
    return entry


def refer(directory: Path, base: str, engines: str) -> None:
    """A tuned model's (or a job's) files as the tuner and the exporter write them, naming a base store entry
    and an engine store entry."""
    (directory / "engines").mkdir(parents=True)
    (directory / "tav_config.json").write_text(json.dumps(
        {"format": "tav-tuned-model", "base": {"path": f"../.bases/{base}", "sha256": base, "id": "sd"}}))
    (directory / "engines" / "manifest.json").write_text(json.dumps(
        {"format": "tav-engines", "store": {"key": engines, "path": f"../../.engines/{engines}"}}))


def gc(repo: Path, grace: float = DEFAULT_GRACE) -> str:
    """`tav-export --gc REPO` in this process (the lock holders are other processes, as in the product); what it
    printed. Its command line is tested by `test_gc_bad_input_is_one_line_exit_2`."""
    printed: list[str] = []
    collect(repo, grace, printed.append)
    return "\n".join(printed) + "\n"


class LockHolder:
    """Another process holding an entry's lock the way the product does: `file_lock` (an export building an
    engine store entry) or `base_in_use` (a tune job using its base), until stopped."""

    CODE = """
import sys
from pathlib import Path
from tuner.base_store import base_in_use
from tuner.io_utils import file_lock
how, where, repo = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
with file_lock(where) if how == "build" else base_in_use(where, None, repo) as held:
    print(held, flush=True)
    sys.stdin.read()
"""

    def __init__(self, how: str, where: Path, repo: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE, how, str(where), str(repo)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.held = self.process.stdout.readline().strip()
        assert self.held, "the lock holder failed"

    def stop(self) -> None:
        self.process.communicate("", timeout=60)


def test_gc_removes_only_the_entries_no_model_or_job_uses(tiny_base, tmp_path):
    """Two models sharing an engine entry and a base, a job in progress (its `.job-*` directory), an export
    building an entry (its lock held), a job using its base (`base_in_use`), an entry made within the grace period,
    one named only by a file that does not parse: all kept; the orphan engine entry, the orphan base and a killed
    writer's leftovers go. Without the grace period, and once the locks are released, what they held goes too."""
    repo = tmp_path / "repo"
    shared, orphan, building, in_job, fresh, named = (c * 20 for c in "abcdef")
    base, orphan_base, job_base = (c * 64 for c in "123")
    for name in (shared, orphan, building, in_job, named):
        store_entry(repo, ".engines", name)
    store_entry(repo, ".engines", fresh, age=10)
    store_entry(repo, ".engines", f"{orphan}.failed")
    store_entry(repo, ".engines", f".{orphan}.tmp-x1y2")
    for name in (base, orphan_base, job_base):
        store_entry(repo, ".bases", name)
    refer(repo / "model-a", base, shared)
    refer(repo / "model-b", base, shared)
    refer(repo / f".job-{'0' * 32}-1", job_base, in_job)  # a job exporting, not yet published
    (repo / "model-broken").mkdir()
    (repo / "model-broken" / "tav_config.json").write_text("[" * 100_000 + f'"{named}"')

    def entries(store: str) -> list[str]:
        names = os.listdir(repo / store)
        assert not [n for n in names if ".tmp-" in n or ".gc-" in n]
        return sorted(n for n in names if not n.startswith("."))

    builder = LockHolder("build", repo / ".engines" / f".{building}.lock", repo)
    user = LockHolder("use", tiny_base, repo)  # copies the tiny base into .bases/ and holds it
    in_use = Path(user.held).name
    try:
        printed = gc(repo)
        assert entries(".engines") == sorted([shared, building, in_job, fresh, named])
        assert entries(".bases") == sorted([base, job_base, in_use])
        assert f"removed .engines/{orphan} " in printed and f"removed .bases/{orphan_base} " in printed

        gc(repo, grace=0)  # no grace: the locks keep what is in use
        assert entries(".engines") == sorted([shared, building, in_job, named])
        assert entries(".bases") == sorted([base, job_base, in_use])
    finally:
        builder.stop()
        user.stop()
    gc(repo, grace=0)
    assert entries(".engines") == sorted([shared, in_job, named])
    assert entries(".bases") == sorted([base, job_base])


@pytest.mark.parametrize("args, message", [
    (["--gc", "/nonexistent/repo"], "/nonexistent/repo is not a directory"),
    (["--gc", ".", "--grace", "nan"], "--grace must be"),
    (["--gc", ".", "--model", "x"], "not allowed with argument"),
])
def test_gc_bad_input_is_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main(args)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and message in err and not out


@pytest.mark.parametrize("files, expected", [
    ({}, None),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
])
def test_the_cpu_budget_is_the_affinity_bounded_by_the_cgroup_quota(files, expected, tmp_path):
    """A Kubernetes CPU limit (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) bounds the tuning threads; without one,
    the CPU affinity does."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = len(os.sched_getaffinity(0))
    assert cpu_budget(tmp_path) == (cores if expected is None else min(cores, expected))


def test_every_tuning_process_starts_with_the_tuning_openmp_settings(tmp_path):
    """The server's local worker is spawned with `tuner.threads.OPENMP` and a thread count from the CPU budget,
    whatever the server's own environment (its serving policy, an inherited spin count); the two tuning commands
    set them before torch loads (the `tuner` package and `tuner.threads` import no torch)."""
    code = """
import json, os, sys, time
os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="300000")  # what a parent may have set
os.environ.pop("OMP_NUM_THREADS", None)
import tuner.threads
assert "torch" not in sys.modules
from pathlib import Path
from jobs.local import LocalJobStore
store = LocalJobStore(Path(sys.argv[1]), "cpu", 60.0)
store._start_worker()
while b"spawn_main" not in open(f"/proc/{store._process.pid}/cmdline", "rb").read():  # until it has exec'd
    time.sleep(0.01)
environ = dict(v.split("=", 1) for v in open(f"/proc/{store._process.pid}/environ").read().split("\\0") if v)
store._process.terminate()
store._process.join(60)
print(json.dumps({k: environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}))
"""
    (tmp_path / "repo").mkdir()
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "repo")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {**OPENMP, "OMP_NUM_THREADS": str(cpu_budget())}
    scripts = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'tav-tune = "tuner.threads:tav_tune"' in scripts
    assert 'tav-tune-worker = "tuner.threads:tav_tune_worker"' in scripts
