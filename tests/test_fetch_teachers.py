"""scripts/fetch_teachers.py against a local HTTP server serving release files the tests write:
RepDistiller's per-teacher checkpoints and mdistiller's archive, a download resumed by a range
request, a file of the wrong architecture, no network, and the accuracy check on CIFAR-100."""
import contextlib
import http.server
import io
import socket
import sys
import tarfile
import threading

import pytest
import torch

import evaluate
from conftest import ROOT
from engine.build import build_model
from test_dataset import files_only_integrity, write_cifar100  # noqa: F401  (a fixture)

sys.path.insert(0, str(ROOT / "scripts"))
import fetch_teachers  # noqa: E402

ARCH = "resnet56"


def repdistiller_checkpoint(arch: str, seed: int = 0) -> bytes:
    """A checkpoint in RepDistiller's format: {'model': state_dict, 'epoch', 'accuracy'}."""
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save({"model": build_model(arch, 100).state_dict(), "epoch": 240, "accuracy": 72.0}, buffer)
    return buffer.getvalue()


class Release(http.server.BaseHTTPRequestHandler):
    """Serves `files` (URL path -> bytes), honouring `Range: bytes=N-` as a release host does."""
    files: dict = {}
    ranges: list = []

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Release.files, Release.ranges = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Release)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@contextlib.contextmanager
def closed_port():
    """A URL on a local port that is bound but never listens, so a connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def fetch(save_dir, base_url, *extra):
    return fetch_teachers.main(["--save_dir", str(save_dir), "--base_url", base_url, "--models", ARCH,
                                "--data_folder", str(save_dir / "no_data"), *extra])


def test_list_names_every_teacher_and_its_origin(tmp_path, capsys):
    assert fetch_teachers.main(["--list", "--save_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(fetch_teachers.TEACHERS)
    for arch, line in zip(fetch_teachers.TEACHERS, out):
        assert f"http://shape2prog.csail.mit.edu/repo/{arch}_vanilla/ckpt_epoch_240.pth" in line
        assert str(tmp_path / "models" / f"{arch}_vanilla" / "ckpt_epoch_240.pth") in line and "[to fetch]" in line
    assert not (tmp_path / "models").exists()


def test_repdistiller_teacher_lands_in_its_layout_and_loads_strictly(tmp_path, server, capsys):
    payload = repdistiller_checkpoint(ARCH)
    Release.files[f"/{ARCH}_vanilla/ckpt_epoch_240.pth"] = payload
    assert fetch(tmp_path, server) == 0
    target = tmp_path / "models" / f"{ARCH}_vanilla" / "ckpt_epoch_240.pth"
    assert target.read_bytes() == payload
    out = capsys.readouterr().out
    assert f"{ARCH}" in out and "loads strictly" in out and "accuracies not checked" in out


def test_an_interrupted_download_resumes_from_its_part_file(tmp_path, server):
    payload = repdistiller_checkpoint(ARCH)
    Release.files[f"/{ARCH}_vanilla/ckpt_epoch_240.pth"] = payload
    target = tmp_path / "models" / f"{ARCH}_vanilla" / "ckpt_epoch_240.pth"
    target.parent.mkdir(parents=True)
    half = len(payload) // 2
    target.with_name(target.name + ".part").write_bytes(payload[:half])
    assert fetch(tmp_path, server) == 0
    assert Release.ranges == [half]
    assert target.read_bytes() == payload and not target.with_name(target.name + ".part").exists()


def test_mdistiller_archive_yields_the_same_layout(tmp_path, server):
    payload = repdistiller_checkpoint(ARCH, seed=1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(f"cifar_teachers/{ARCH}_vanilla/ckpt_epoch_240.pth")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    Release.files["/cifar_teachers.tar"] = buffer.getvalue()
    assert fetch(tmp_path, server, "--source", "mdistiller") == 0
    assert (tmp_path / "models" / f"{ARCH}_vanilla" / "ckpt_epoch_240.pth").read_bytes() == payload


def test_a_file_of_another_architecture_is_one_line_and_set_aside(tmp_path, server, capsys):
    Release.files[f"/{ARCH}_vanilla/ckpt_epoch_240.pth"] = repdistiller_checkpoint("resnet20")
    with pytest.raises(SystemExit) as stop:
        fetch(tmp_path, server)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit architecture resnet56" in err[0] and ".bad" in err[0]
    folder = tmp_path / "models" / f"{ARCH}_vanilla"
    assert not (folder / "ckpt_epoch_240.pth").exists() and (folder / "ckpt_epoch_240.pth.bad").is_file()


def test_offline_is_one_line_and_writes_nothing(tmp_path, capsys):
    with closed_port() as url:
        with pytest.raises(SystemExit) as stop:
            fetch(tmp_path, url)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot download") and "--base_url" in err[0]
    assert not (tmp_path / "models").exists()


@pytest.mark.usefixtures("files_only_integrity")
def test_with_cifar100_present_the_test_accuracy_is_printed_beside_the_published_one(tmp_path, server, capsys):
    Release.files[f"/{ARCH}_vanilla/ckpt_epoch_240.pth"] = repdistiller_checkpoint(ARCH)
    data = tmp_path / "data"
    write_cifar100(data)
    assert fetch_teachers.main(["--save_dir", str(tmp_path), "--base_url", server, "--models", ARCH,
                                "--data_folder", str(data)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    target = tmp_path / "models" / f"{ARCH}_vanilla" / "ckpt_epoch_240.pth"
    report = evaluate.main([str(target), "--data_folder", str(data), "--device", "cpu", "--latency_runs", "1",
                            "--latency_warmup", "0"])
    assert f"test top-1 {report['top1']:.2f} (published 72.34)" in line


