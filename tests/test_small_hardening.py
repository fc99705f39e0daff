"""Issue 16, point 9: key files, image reads, forged checkpoints, the bad-file hint."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from sourcefree.data import imaging
from sourcefree.data.imaging import ImageDecodeError, decode_image
from sourcefree.engine.method import (
    Batch,
    Method,
    OptimizerSpec,
    ParamGroup,
    Phase,
    StepOutput,
    TargetData,
)
from sourcefree.engine.trainer import StepInfo, Trainer
from sourcefree.engine.workdir import Workdir
from sourcefree.errors import CheckpointError, DatasetError, RunInterruptedError, SignatureError
from sourcefree.package.loader import sign_package
from sourcefree.package.manifest import InputSpec
from sourcefree.package.signing import (
    MAX_KEY_BYTES,
    keygen,
    load_private_key,
    load_public_key,
)

# -- 1. key files -------------------------------------------------------------------------

_LOAD_IN_CHILD = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from sourcefree.errors import SignatureError
    from sourcefree.package.signing import load_private_key, load_public_key
    try:
        (load_private_key if sys.argv[1] == "private" else load_public_key)(sys.argv[2])
    except SignatureError as exc:
        print("SignatureError:", exc)
    """
)


def _run_child(argv: list[str], timeout: float, blocked: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` single-threaded; a hang fails the test with ``blocked``, not the run."""
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(blocked)


def _load_in_child(kind: str, path: str) -> str:
    """Load a key in a child process (memory-capped; a hang fails the test, not the run)."""
    argv = [sys.executable, "-c", _LOAD_IN_CHILD, kind, path]
    done = _run_child(argv, 120, f"loading a {kind} key from {path} blocked")
    return done.stdout + done.stderr


@pytest.mark.parametrize("kind", ["private", "public"])
@pytest.mark.parametrize("special", ["dev-zero", "fifo", "directory"])
def test_key_from_a_device_fifo_or_directory_is_refused_unread(
    tmp_path: Path, kind: str, special: str
) -> None:
    path = {"dev-zero": "/dev/zero", "fifo": str(tmp_path / "k.pipe"), "directory": str(tmp_path)}
    if special == "fifo":
        os.mkfifo(path["fifo"])  # no writer: a blocking open or read never returns
    out = _load_in_child(kind, path[special])
    assert out.startswith("SignatureError:"), out
    assert "is not a regular file" in out and "Traceback" not in out


def _pem_private(key: Any) -> bytes:
    return cast(
        bytes,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _pem_public(key: Any) -> bytes:
    return cast(
        bytes,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def _unknown_algorithm_key() -> bytes:
    """A PKCS#8 key whose algorithm OID (1.3.101.127) no library knows."""
    der = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    der = der.replace(b"\x06\x03\x2b\x65\x6e", b"\x06\x03\x2b\x65\x7f", 1)
    body = base64.encodebytes(der)
    return b"-----BEGIN PRIVATE KEY-----\n" + body + b"-----END PRIVATE KEY-----\n"


def _ec() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _rsa() -> Any:
    return rsa.generate_private_key(65537, 1024)


_OTHER = "not an Ed25519"


@pytest.mark.parametrize(
    ("make", "loader", "match"),
    [
        (lambda: _pem_private(_ec()), "private", _OTHER),
        (lambda: _pem_public(_ec()), "public", _OTHER),
        (lambda: _pem_private(_rsa()), "private", _OTHER),
        (lambda: _pem_public(_rsa()), "public", _OTHER),
        (lambda: _pem_private(x25519.X25519PrivateKey.generate()), "private", _OTHER),
        (lambda: _pem_public(x25519.X25519PrivateKey.generate()), "public", _OTHER),
        (_unknown_algorithm_key, "private", "not an unencrypted PEM key"),
        (lambda: b"", "private", "is empty"),
        (lambda: b"\n  \n", "public", "is empty"),
    ],
)
def test_key_of_another_type_is_a_typed_error(
    tmp_path: Path, make: Callable[[], bytes], loader: str, match: str
) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(make())
    load = load_private_key if loader == "private" else load_public_key
    with pytest.raises(SignatureError, match=match):
        load(path)


def test_huge_key_file_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "huge.pem"
    with open(path, "wb") as fh:
        fh.truncate(1 << 30)  # sparse: a full read would take a GiB
    with pytest.raises(SignatureError, match=r"is too large \(1073741824 bytes\)"):
        load_public_key(path)
    with pytest.raises(SignatureError, match="too large"):
        load_private_key(b"x" * (MAX_KEY_BYTES + 1))


def test_cli_verify_and_sign_with_a_fifo_key_exit_2(pkg_copy: Path, tmp_path: Path) -> None:
    priv, _ = keygen(tmp_path / "vendor")
    sign_package(pkg_copy, priv)
    fifo = tmp_path / "key.pipe"
    os.mkfifo(fifo)
    for command in (["verify", str(pkg_copy), "--key", str(fifo)], ["sign", str(pkg_copy)]):
        args = [*command, "--key", str(fifo)] if command[0] == "sign" else command
        argv = [sys.executable, "-m", "sourcefree", *args]
        done = _run_child(argv, 300, f"`sourcefree {command[0]}` blocked on a FIFO key")
        assert done.returncode == 2, done.stderr
        assert "is not a regular file" in done.stderr and "Traceback" not in done.stderr


# -- 2. image reads -------------------------------------------------------------------------


def _peak(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_a_small_image_does_not_reserve_the_file_cap(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(path)
    assert path.stat().st_size < 1024
    assert _peak(lambda: decode_image(path, "rgb")) < 1 << 20
    with open(path, "rb") as fh:
        assert _peak(lambda: decode_image(fh, "rgb")) < 1 << 20


def test_oversized_image_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    with open(path, "wb") as fh:
        fh.truncate(imaging.MAX_FILE_BYTES + 1)  # sparse
    with pytest.raises(ImageDecodeError, match="too large"):
        assert _peak(lambda: decode_image(path, "rgb")) < 1 << 20


def test_endless_stream_is_refused_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", 4096)
    with open("/dev/zero", "rb") as fh, pytest.raises(ImageDecodeError, match="too large"):
        decode_image(fh, "rgb")
    data = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(data, "PNG")
    data.seek(0)
    assert decode_image(data, "gray").size == (4, 4)


# -- 4. the bad-file hint ---------------------------------------------------------------------


def _folder_with_bad_files(root: Path) -> None:
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / f"good{i}.png")
    (root / "bad.png").write_bytes(b"not an image")


def test_bad_file_hint_names_the_log_only_when_there_is_one(tmp_path: Path) -> None:
    from sourcefree.data.readers import read_image_folder

    root = tmp_path / "data"
    _folder_with_bad_files(root)
    with pytest.raises(DatasetError) as no_log:
        read_image_folder(root).load(size=8, max_bad_fraction=0.1)
    assert "a log file names them" not in str(no_log.value)
    assert "no log was kept" in str(no_log.value) and "log_path=" in str(no_log.value)
    log = tmp_path / "skipped.log"
    with pytest.raises(DatasetError) as with_log:
        read_image_folder(root).load(size=8, max_bad_fraction=0.1, log_path=log)
    assert "the local log given as log_path names them" in str(with_log.value)
    assert "bad.png" in log.read_text()
    assert str(tmp_path) not in str(with_log.value), "never a path in the message"
    with pytest.raises(DatasetError, match="no log was kept"):
        read_image_folder(root).load(size=8, strict=True)


# -- 3. forged checkpoints --------------------------------------------------------------------

N_IMAGES, BATCH, EPOCHS = 16, 4, 2  # 4 steps per epoch


class _Toy(Method):
    """A linear model on 2x2 grey images, trained with Adam (cheap real checkpoints)."""

    name = "toy-hardening"
    config_class = dict

    def __init__(self) -> None:
        super().__init__(None, cast(Any, None))
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)

    def _step(self, batch: Batch) -> StepOutput:
        return StepOutput(self.net(batch.x.flatten(1)).square().mean())

    def phases(self) -> Sequence[Phase]:
        return [
            Phase(
                "fit",
                EPOCHS,
                self._step,
                batch_size=BATCH,
                parameters=lambda: [ParamGroup(list(self.net.parameters()))],
                optimizer=OptimizerSpec("adam", lr=1e-2),
                amp=False,
            )
        ]

    def modules(self) -> Mapping[str, nn.Module]:
        return {"net": self.net}

    def export_model(self) -> Any:
        return self.net


def _data() -> TargetData:
    images = np.random.default_rng(0).integers(0, 255, (N_IMAGES, 2, 2, 1), dtype=np.uint8)
    spec = InputSpec(size=(2, 2), channels=1, color="gray", mean=(0.5,), std=(0.5,))
    return TargetData(images, spec, "toy")


def _trainer(wd: Workdir, stop_at: int | None = None) -> Trainer:
    def hook(info: StepInfo) -> None:
        if info.global_step == stop_at:
            info.request_stop()

    return Trainer(_Toy(), _data(), device=torch.device("cpu"), workdir=wd, on_step=hook)


def _forge(
    folder: Path,
    meta_edit: Callable[[dict[str, Any]], None] | None = None,
    tensor_edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
    raw_tensors: bytes | None = None,
) -> None:
    """Change a checkpoint and re-hash it: the forgery is consistent."""
    meta = json.loads((folder / "state.json").read_bytes())
    tensors = load_safetensors((folder / "state.safetensors").read_bytes())
    if meta_edit is not None:
        meta_edit(meta)
    if tensor_edit is not None:
        tensor_edit(tensors)
    blobs = {
        "state.json": json.dumps(meta).encode(),
        "state.safetensors": raw_tensors if raw_tensors is not None else save_safetensors(tensors),
    }
    manifest = json.loads((folder / "MANIFEST.json").read_bytes())
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def _interrupted(tmp_path: Path, step: int = 3) -> tuple[Workdir, Path]:
    wd = Workdir(tmp_path / "run").open()
    with pytest.raises(RunInterruptedError):
        _trainer(wd, stop_at=step).run()
    return wd, wd.path / "checkpoints" / "ckpt-00000001"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = meta
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def test_consistent_rehash_of_an_honest_checkpoint_still_resumes(tmp_path: Path) -> None:
    wd, folder = _interrupted(tmp_path)
    _forge(folder)  # same contents, re-hashed: the forging helper itself breaks nothing
    result = _trainer(wd).run(resume=True)
    assert result.resumed_from == 1 and result.phases[0].done
    wd.close()


def _both(pairs: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        for path, value in pairs.items():
            _set(path, value)(meta)

    return edit


META_FORGERIES = {
    "negative epoch": _set("position.epoch", -1),
    "huge epoch": _both({"position.epoch": 10**12, "position.global_step": 4 * 10**12}),
    "step past the batches": _both({"position.step": 4, "position.global_step": 4}),
    "inconsistent global step": _set("position.global_step", 10**15),
    "phase past the last": _set("position.phase", 5),
    "history of another run": _set("history.0.steps_per_epoch", 1000),
    "history with a string loss": _set("history.0.epoch_loss", ["x"]),
    "short python RNG": _set("rng.python.1", [1, 2, 3]),
    "numpy RNG position": _set("rng.numpy.1", 10**9),
    "long epoch sums": _set("epoch_sums", {"loss": [0.0] * 100}),
    "no format": _set("format", "other"),
    "negative learning rate": _set("optimizer.param_groups.0.lr", -1.0),
    "adam betas as text": _set("optimizer.param_groups.0.betas", "fast"),
    "state of a parameter that does not exist": _set(
        "optimizer.state.7", {"step": {"__tensor__": True}}
    ),
}


@pytest.mark.parametrize("forgery", sorted(META_FORGERIES))
def test_forged_checkpoint_metadata_is_refused(tmp_path: Path, forgery: str) -> None:
    wd, folder = _interrupted(tmp_path)
    _forge(folder, meta_edit=META_FORGERIES[forgery])
    with pytest.raises(CheckpointError, match="is damaged or was not written by this run") as err:
        _trainer(wd).run(resume=True)
    assert str(wd.path) in str(err.value) and "without --resume" in str(err.value)
    wd.close()


def _drop_exp_avg_sq(meta: dict[str, Any]) -> None:
    for entries in meta["optimizer"]["state"].values():
        entries.pop("exp_avg_sq")


def _tensor(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = value

    return edit


TENSOR_FORGERIES: dict[str, tuple[Any, Any]] = {
    "short torch RNG": (None, _tensor("rng.torch", torch.zeros(10, dtype=torch.uint8))),
    "float numpy RNG": (None, _tensor("rng.numpy", torch.zeros(624))),
    "numpy RNG out of range": (
        None,
        _tensor("rng.numpy", torch.full((624,), -1, dtype=torch.int64)),
    ),
    "optimizer moment of another shape": (None, _tensor("optim.0.exp_avg", torch.zeros(3, 3))),
    "optimizer step not a scalar": (None, _tensor("optim.0.step", torch.zeros(5))),
    "optimizer entry missing": (_drop_exp_avg_sq, None),
}


@pytest.mark.parametrize("forgery", sorted(TENSOR_FORGERIES))
def test_forged_checkpoint_tensors_are_refused(tmp_path: Path, forgery: str) -> None:
    wd, folder = _interrupted(tmp_path)
    meta_edit, tensor_edit = TENSOR_FORGERIES[forgery]
    _forge(folder, meta_edit=meta_edit, tensor_edit=tensor_edit)
    with pytest.raises(CheckpointError, match="is damaged or was not written by this run"):
        _trainer(wd).run(resume=True)
    wd.close()


def test_tensor_claiming_2_40_elements_is_refused(tmp_path: Path) -> None:
    wd, folder = _interrupted(tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 8]}})
    raw = struct.pack("<Q", len(header)) + header.encode() + bytes(8)
    _forge(folder, raw_tensors=raw)
    with (
        pytest.warns(RuntimeWarning, match="damaged"),
        pytest.raises(CheckpointError, match="no checkpoint in the run directory could be read"),
    ):
        _trainer(wd).run(resume=True)
    wd.close()


def test_cli_resume_of_a_forged_checkpoint_exits_2(source_pkg: Path, tmp_path: Path) -> None:
    from sourcefree.cli.commands_adapt import adapt_command
    from sourcefree.data.synthetic import write_domain
    from sourcefree.pipeline.adaptation import AdaptRequest, adapt

    data = write_domain(tmp_path / "wild", "wild-mild", 32, 32, seed=5)
    sets = ["batch_size=16", "epochs=2"]
    wd = tmp_path / "wd"

    def stop(info: StepInfo) -> None:
        if info.global_step == 1:
            info.request_stop()

    with pytest.raises(RunInterruptedError):
        adapt(
            AdaptRequest(
                source_pkg,
                data,
                method="tent",
                out=tmp_path / "o",
                overrides=sets,
                workdir=wd,
                device="cpu",
                on_step=stop,
            )
        )
    _forge(wd / "checkpoints" / "ckpt-00000001", meta_edit=_set("position.epoch", -1))
    args = [str(source_pkg), str(data), "-m", "tent", "-o", str(tmp_path / "o"), "--resume"]
    args += ["--workdir", str(wd), "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(adapt_command, [*args, "--set", sets[0], "--set", sets[1]])
    assert result.exit_code == 2, result.output
    assert "is damaged or was not written by this run" in result.output
    assert "Traceback" not in result.output
