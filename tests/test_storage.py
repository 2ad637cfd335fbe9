"""Run folders in object storage, against a real S3-compatible server on 127.0.0.1.

Only the round trip depends on the Keras backend (it trains and replays); the rest is the
same code under either, so it runs under TensorFlow only.

moto's standalone server runs in this process (``ThreadedMotoServer``) with IAM
authentication on, so a wrong key is refused as S3 refuses it; s3fs reaches it through
``AWS_ENDPOINT_URL_S3``, which every test sets before any call, with
``AWS_EC2_METADATA_DISABLED`` so that botocore probes no metadata service. Nothing here
contacts a cloud endpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import build_model, make_data
from trueloss_replay import ReplayCheckpoint, load_history, replay
from trueloss_replay.cli import main
from trueloss_replay.errors import MissingDependencyError, StorageError
from trueloss_replay.run import Run, read_checkpoint

BUCKET = "runs"
ROOT = Path(__file__).resolve().parents[1]


class _KillMidUpload:
    """WSGI middleware in front of the server: when armed, it receives half the body of the
    next large checkpoint PUT, then calls ``armed`` (which SIGKILLs the uploading process)
    and hands the server the half body followed by the dead connection."""

    def __init__(self, app):
        self.app = app
        self.armed = None
        self.fired = threading.Event()

    def __call__(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        trap = self.armed
        if (
            trap is not None
            and environ["REQUEST_METHOD"] == "PUT"
            and "/checkpoints/" in environ["PATH_INFO"]
            and length > 1_000_000
        ):
            self.armed = None
            head = environ["wsgi.input"].read(length // 2)
            trap()
            environ["wsgi.input"] = _Prefixed(head, environ["wsgi.input"])
            self.fired.set()
        return self.app(environ, start_response)


class _Prefixed(io.RawIOBase):
    """``head``, then the rest of ``stream``."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    trap: _KillMidUpload


@pytest.fixture(scope="module")
def s3_server():
    import boto3
    import requests
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    trap: list[_KillMidUpload] = []

    class Server(ThreadedMotoServer):
        def _server_entry(self) -> None:  # the parent's, with the middleware in front
            from moto.moto_server.werkzeug_app import (
                DomainDispatcherApplication,
                create_backend_app,
            )

            trap.append(_KillMidUpload(DomainDispatcherApplication(create_backend_app)))
            self._server = make_server(
                self._ip_address, self._port, trap[0], True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    server = Server(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Set up while the server takes any request, then switch IAM authentication on.
    bootstrap = {
        "endpoint_url": endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": "bootstrap",
        "aws_secret_access_key": "bootstrap",
    }
    iam = boto3.client("iam", **bootstrap)
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(policy))
    boto3.client("s3", **bootstrap).create_bucket(Bucket=BUCKET)
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], trap[0])
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        server.stop()


def _s3_environ(server: S3Server, cache: Path) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_S3": server.endpoint,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": server.key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "TRUELOSS_REPLAY_CACHE": str(cache),
    }


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """The server, this process's environment pointed at it, and a fresh prefix."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for name, value in _s3_environ(s3_server, tmp_path / "cache").items():
        monkeypatch.setenv(name, value)
    return s3_server, f"{BUCKET}/{uuid.uuid4().hex[:12]}"


def _bucket():
    """A client of our own to look into the bucket, with no cache of listings."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


# --------------------------------------------------------------------------- round trip


@pytest.mark.backend
def test_train_replay_history_round_trip_through_s3(s3, tmp_path, monkeypatch):
    _, prefix = s3
    url = f"s3://{prefix}/run"
    x, y = make_data(96)
    train, val = (x[:64], y[:64]), (x[64:], y[64:])
    model = build_model()
    callback = ReplayCheckpoint(url, train_data=train, val_data=val)
    model.fit(*train, validation_data=val, epochs=2, batch_size=32, verbose=0, callbacks=[callback])
    # Expected figures from Keras itself, at the final weights, inference mode, no penalty.
    probabilities = model.predict(train[0], verbose=0)
    expected = float(np.mean(keras.losses.sparse_categorical_crossentropy(train[1], probabilities)))
    expected_acc = float(np.mean(np.argmax(probabilities, axis=1) == train[1]))

    bucket = _bucket()
    names = sorted(p.removeprefix(f"{prefix}/run/") for p in bucket.find(f"{prefix}/run"))
    assert names == [
        "checkpoints/e0000.h5",
        "checkpoints/e0001.h5",
        "checkpoints/e0002.h5",
        "data/train.h5",
        "data/val.h5",
        "manifest.json",
        "model.keras",
    ]
    assert json.loads(bucket.cat(f"{prefix}/run/manifest.json"))["status"] == "finished"

    # Another machine: an empty cache, everything comes from the bucket.
    monkeypatch.setenv("TRUELOSS_REPLAY_CACHE", str(tmp_path / "other-cache"))
    result = _cli("replay", url, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"true loss of {url}" in " ".join(result.output.split())
    uploaded = set(bucket.find(f"{prefix}/run/replay"))
    assert {f"{prefix}/run/replay/{n}" for n in ("history.csv", "history.json")} <= uploaded
    assert {f"{prefix}/run/replay/results/e000{i}.json" for i in range(3)} <= uploaded

    monkeypatch.setenv("TRUELOSS_REPLAY_CACHE", str(tmp_path / "third-cache"))
    history = load_history(url)
    assert history.epoch == [0, 1]
    np.testing.assert_allclose(history.history["loss"][-1], expected, rtol=1e-5)
    np.testing.assert_allclose(history.history["accuracy"][-1], expected_acc)
    result = _cli("history", url, "--format", "json")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(
        json.loads(result.output)["history"]["loss"][-1], expected, rtol=1e-5
    )


def test_results_go_to_another_url_and_a_rerun_downloads_only_what_changed(
    s3, trained_run, tmp_path, monkeypatch
):
    _, prefix = s3
    bucket = _bucket()
    bucket.put(str(trained_run.path), f"{prefix}/run", recursive=True)
    run_url, results_url = f"s3://{prefix}/run", f"s3://{prefix}/results"

    replay(run_url, output=results_url, progress=False, epochs="2")

    assert sorted(Path(p).name for p in bucket.find(f"{prefix}/results")) == [
        "e0002.json",
        "history.csv",
        "history.json",
    ]
    assert not bucket.exists(f"{prefix}/run/replay")  # the run folder is left as it was
    mirrored = Path(os.environ["TRUELOSS_REPLAY_CACHE"]) / "s3" / prefix / "run"
    stamps = {p: p.stat().st_mtime_ns for p in mirrored.rglob("*.h5")}
    result = _cli("history", run_url, "--results", results_url, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in mirrored.rglob("*.h5")} == stamps  # no download


def test_checkpoints_pruned_by_keep_are_deleted_from_the_bucket(s3):
    _, prefix = s3
    x, y = make_data(32)
    model = build_model()
    callback = ReplayCheckpoint(f"s3://{prefix}/run", keep=1, save_model=False)

    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[callback])

    bucket = _bucket()
    assert [Path(p).name for p in bucket.find(f"{prefix}/run/checkpoints")] == ["e0002.h5"]
    manifest = json.loads(bucket.cat(f"{prefix}/run/manifest.json"))
    assert [c["name"] for c in manifest["checkpoints"]] == ["e0002.h5"]


# --------------------------------------------------------------------------- kill -9


def test_training_killed_mid_upload_leaves_only_complete_objects(s3_server, s3, tmp_path):
    _, prefix = s3
    url = f"s3://{prefix}/run"
    env = {**os.environ, **_s3_environ(s3_server, tmp_path / "trainer-cache")}
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "trainer_subprocess.py"), "crash", url],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    bucket = _bucket()
    try:
        deadline = time.monotonic() + 120
        while bucket.invalidate_cache() or len(bucket.glob(f"{prefix}/run/checkpoints/*.h5")) < 1:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.2)
        s3_server.trap.armed = lambda: (process.send_signal(signal.SIGKILL), process.wait())
        assert s3_server.trap.fired.wait(120), "no checkpoint upload to interrupt"
    finally:
        s3_server.trap.armed = None
        process.kill()
        process.wait()
    s3_server.trap.fired.clear()
    assert process.returncode == -signal.SIGKILL

    listed = bucket.find(f"{prefix}/run", detail=True)
    checkpoints = sorted(p for p in listed if "/checkpoints/" in p)
    manifest = json.loads(bucket.cat(f"{prefix}/run/manifest.json"))
    assert all(Path(p).name.startswith("e") for p in listed if "/checkpoints/" in p)
    assert checkpoints
    # The interrupted checkpoint is in the trainer's local mirror but not in the bucket.
    staged = tmp_path / "trainer-cache" / "s3" / prefix / "run" / "checkpoints"
    assert len(list(staged.glob("e*.h5"))) > len(checkpoints)
    (tmp_path / "check").mkdir()
    for path in checkpoints:  # each object reads completely
        local = tmp_path / "check" / Path(path).name
        bucket.get_file(path, str(local))
        checkpoint = read_checkpoint(local)
        with h5py.File(local) as f:
            sizes = [f["weights"][k][()].size for k in _datasets(f["weights"])]
        assert checkpoint.error is None and sum(sizes) > 4_000_000
    assert {c["name"] for c in manifest["checkpoints"]} <= {Path(p).name for p in checkpoints}
    # Opened again with the trainer's cache (a resume), the mirror drops what never got up.
    os.environ["TRUELOSS_REPLAY_CACHE"] = str(tmp_path / "trainer-cache")
    assert [c.name for c in Run(url).checkpoints()] == [Path(p).name for p in checkpoints]


def _datasets(group, prefix=""):
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            yield from _datasets(item, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["history", "inspect", "replay"])
def test_wrong_credentials_are_a_one_line_error_naming_the_url(
    command, s3, trained_run, monkeypatch
):
    _, prefix = s3
    _bucket().put(str(trained_run.path), f"{prefix}/run", recursive=True)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")

    result = _cli(command, f"s3://{prefix}/run")

    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert f"cannot read s3://{prefix}/run: the credentials were refused" in result.output
    assert "AWS_SECRET_ACCESS_KEY" in result.output and "Traceback" not in result.output


def test_callback_with_an_unknown_key_fails_before_training(s3, monkeypatch):
    _, prefix = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")

    with pytest.raises(StorageError, match=rf"cannot read s3://{prefix}/run: the credentials"):
        ReplayCheckpoint(f"s3://{prefix}/run")


def test_callback_names_a_missing_bucket_before_training(s3):
    with pytest.raises(StorageError, match=r"cannot read s3://no-such-bucket/run: .*bucket"):
        ReplayCheckpoint("s3://no-such-bucket/run")


def test_a_url_without_a_run_is_named_as_the_url(s3):
    _, prefix = s3

    result = _cli("history", f"s3://{prefix}/nothing")

    assert result.exit_code == 1
    assert f"Error: s3://{prefix}/nothing has no manifest.json" in result.output


@pytest.mark.parametrize("command", ["history", "inspect", "replay", "plot", "explain"])
def test_protocol_without_its_package_names_the_extra(command, tmp_path, monkeypatch):
    pytest.importorskip("fsspec")
    if _installed("gcsfs"):
        pytest.skip("gcsfs is installed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRUELOSS_REPLAY_CACHE", str(tmp_path / "cache"))

    result = _cli(command, "gs://bucket/run")

    assert result.exit_code == 1
    assert result.output == (
        "Error: run folder 'gs://bucket/run' is on gs://, whose fsspec package is not "
        "installed: pip install 'trueloss-replay[gcs]'.\n"
    )
    assert os.listdir(tmp_path) == []  # no local folder named gs:, no cache


def test_callback_refuses_a_protocol_without_its_package_before_training(tmp_path, monkeypatch):
    if _installed("gcsfs"):
        pytest.skip("gcsfs is installed")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(MissingDependencyError, match=r"pip install 'trueloss-replay\[gcs\]'"):
        ReplayCheckpoint("gs://bucket/run")

    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args, url",
    [
        (["RUN", "--follow"], "s3://bucket/run"),
        (["LOCAL", "--follow", "--logdir", "s3://bucket/logs"], "s3://bucket/logs"),
        (["RUN", "--shard", "0/2"], "s3://bucket/run"),
    ],
)
def test_follow_and_shards_refuse_a_url(tmp_path, monkeypatch, args, url):
    monkeypatch.chdir(tmp_path)
    swap = {"RUN": "s3://bucket/run", "LOCAL": str(tmp_path / "run")}
    result = _cli("replay", *[swap.get(a, a) for a in args], "--no-progress")

    assert result.exit_code == 2, result.output
    assert "local folders only" in result.output or "shared file system" in result.output
    assert f"not '{url}'" in " ".join(result.output.split())
    assert os.listdir(tmp_path) == []  # no local folder named "s3:"


def test_a_local_file_option_refuses_a_url(replayed_run):
    result = _cli("history", str(replayed_run), "-o", "s3://bucket/history.csv")

    assert result.exit_code == 2
    assert "'s3://bucket/history.csv' is a URL; this option takes a local file" in result.output


# --------------------------------------------------------------------------- file://


def test_file_url_is_mirrored_and_written_back_atomically(replayed_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TRUELOSS_REPLAY_CACHE", str(tmp_path / "cache"))
    url = replayed_run.resolve().as_uri()

    pytest.importorskip("tensorboard")
    logdir = tmp_path / "logs"
    run = Run(url)
    result = _cli("history", url, "--format", "csv", "-o", str(tmp_path / "h.csv"))
    export = _cli("plot", url)
    events = _cli("export", url, "--logdir", logdir.as_uri())

    assert run.path != replayed_run and [c.name for c in run.checkpoints()] == [
        c.name for c in Run(replayed_run).checkpoints()
    ]
    assert result.exit_code == 0, result.output
    assert export.exit_code == 0, export.output
    assert (replayed_run / "replay" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in (replayed_run / "replay").iterdir() if p.name.startswith(".")]
    assert events.exit_code == 0, events.output
    assert [p.parent.name for p in logdir.rglob("*tfevents*")]  # uploaded to the logdir URL
    again = _cli("export", url, "--logdir", logdir.as_uri())
    assert again.exit_code == 0, again.output
    folders = [p.parent.name for p in logdir.rglob("*tfevents*")]
    assert sorted(folders) == sorted(set(folders))  # the earlier export left the URL too


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None
