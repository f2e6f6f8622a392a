"""A private containerd (Debian's ``containerd``) with its CRI plugin, under one short directory.

I/O: runs ``containerd``, ``ctr`` and ``runc`` as child processes, writes their config under
``base_dir``, makes one CRI call (RuntimeService/Version, over grpc) to see whether the CRI
plugin answers, reads ``/proc`` and unmounts what a stopped daemon left under its directory.
Everything it owns lives under ``base_dir``: the socket, root (content store, snapshots,
image metadata), state, runc's state, a ``config.toml`` that no system file reaches, and
``certs.d/<host>/hosts.toml`` registry host configuration (``config_path``), with which the
sandbox's plain-HTTP registries on 127.0.0.1 are reachable. The CNI directories named in the
config do not exist: image operations need no networking, and pod sandboxes run in the
node's network namespace. Stopping is by PID, shims and their containers included. One path
is not ours to choose: containerd 1.6's shims put their sockets in /run/containerd/s/ (a
name hashed from our socket's path), and remove them when they exit.

Two details this machine taught: runc cannot lower a process's oom_score_adj without
CAP_SYS_RESOURCE, so the CRI plugin keeps it no lower than containerd's own
(``restrict_oom_score_adj``); and no pause image can be fetched, so a one-file image whose
only program sleeps forever (a static ELF of some 130 bytes, written here) is imported as the
``sandbox_image``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import struct
import subprocess
import tarfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from cedar.sandbox.dockerd import _pids_mentioning, _unmount_under
from cedar.sandbox.errors import SandboxError, SocketPathTooLongError
from cedar.sandbox.procs import ManagedProcess, find_binary, kill_pid

__all__ = ["CRI_NAMESPACE", "PAUSE_IMAGE", "Containerd", "CtrCommandError", "image_archive"]

CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin (and the kubelet) uses
BUILD_NAMESPACE = "cedar-build"  # where push_image stages images: invisible to the CRI
PAUSE_IMAGE = "cedar.local/pause:3"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes; containerd adds ".ttrpc"

# pause(2) in a loop (x86-64: mov eax, 34; syscall; jmp back) and ppoll(2) with no file
# descriptors and no timeout in a loop (arm64), the sleepers of the pause image.
_SLEEPERS = {
    "x86_64": (62, bytes.fromhex("b8220000000f05ebf7")),
    "aarch64": (
        183,
        b"".join(
            struct.pack("<I", word)
            for word in (0xD2800000, 0xD2800001, 0xD2800002, 0xD2800003, 0xD2800928, 0xD4000001)
        )
        + struct.pack("<I", 0x17FFFFFA),
    ),
}
_OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class CtrCommandError(SandboxError, RuntimeError):
    """``ctr`` or ``runc`` failed; the message carries its output."""


def sleeper_elf(machine: str | None = None) -> bytes:
    """A static ELF executable that sleeps until killed, for this machine's architecture."""
    arch = machine or platform.machine()
    if arch not in _SLEEPERS:
        raise SandboxError(f"no pause program for {arch!r} (only {', '.join(_SLEEPERS)})")
    e_machine, code = _SLEEPERS[arch]
    base, headers = 0x400000, 64 + 56
    total = headers + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # 64-bit, little endian, version 1
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 2, e_machine, 1, base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + code


def _tar(members: Iterable[tuple[str, bytes, int]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def image_archive(
    ref: str,
    files: Iterable[tuple[str, bytes, int]],
    *,
    entrypoint: list[str] | None = None,
    labels: Mapping[str, str] | None = None,
    machine: str | None = None,
) -> bytes:
    """A one-layer image named ``ref`` as a `docker save` archive, for ``ctr images import``."""
    layer = _tar(files)
    config: dict[str, object] = {
        "architecture": _OCI_ARCH.get(machine or platform.machine(), "amd64"),
        "os": "linux",
        "config": {"Entrypoint": entrypoint or [], "Labels": dict(labels or {})},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    blob = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(blob).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": ["layer.tar"]}]
    return _tar(
        [
            (config_name, blob, 0o644),
            ("layer.tar", layer, 0o644),
            ("manifest.json", json.dumps(manifest).encode(), 0o644),
        ]
    )


def hosts_toml(host: str) -> str:
    """containerd's registry host configuration for a plain-HTTP registry at ``host``."""
    return (
        f'server = "http://{host}"\n\n'
        f'[host."http://{host}"]\n'
        '  capabilities = ["pull", "resolve", "push"]\n'
    )


def cri_answers(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether a CRI server at ``endpoint`` answers RuntimeService/Version.

    An empty message is a valid VersionRequest, and any reply is a VersionResponse, so this
    needs no generated stubs (those belong to the puller).
    """
    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(
            "/runtime.v1.RuntimeService/Version",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        try:
            call(b"", timeout=timeout)
        except grpc.RpcError:
            return False
    return True


class Containerd(ManagedProcess):
    """``containerd`` with the CRI plugin, its socket, root and state under ``base_dir``.

    Keep ``base_dir`` short (``tempfile.mkdtemp(prefix="cedar-", dir="/tmp")``): unix socket
    paths are limited to about 100 bytes. ``registries`` (``host:port``) get a plain-HTTP
    hosts.toml; :meth:`add_registry` adds more while it runs (containerd reads config_path
    at every pull).
    """

    name = "containerd"
    start_timeout = 60.0
    stop_grace = 15.0

    def __init__(
        self,
        base_dir: str | Path,
        *,
        registries: Iterable[str] = (),
        log_level: str = "info",
        binary: str | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        probe = self.socket_path.with_name(self.socket_path.name + ".ttrpc")
        if len(str(probe).encode()) > _MAX_SOCKET_PATH:
            raise SocketPathTooLongError(
                f"base_dir {self.base_dir} is too long for unix socket paths "
                f"({probe} > {_MAX_SOCKET_PATH} bytes); use a short directory such as "
                "tempfile.mkdtemp(prefix='cedar-', dir='/tmp')"
            )
        self.registries = list(registries)
        self.log_level = log_level
        self._binary = binary
        ManagedProcess.__init__(self, self.base_dir / "containerd.log")

    # --- paths --------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.base_dir / "containerd.sock"

    @property
    def endpoint(self) -> str:
        """The CRI endpoint (CEDAR_CRI_ENDPOINT) of this containerd."""
        return f"unix://{self.socket_path}"

    @property
    def root(self) -> Path:
        return self.base_dir / "root"

    @property
    def state(self) -> Path:
        return self.base_dir / "state"

    @property
    def runc_root(self) -> Path:
        return self.base_dir / "runc"

    @property
    def certs_dir(self) -> Path:
        return self.base_dir / "certs.d"

    @property
    def config_path(self) -> Path:
        return self.base_dir / "config.toml"

    @property
    def cni_dir(self) -> Path:
        """Named in the config, never created: the CRI plugin then has no pod network."""
        return self.base_dir / "no-cni"

    @property
    def snapshots(self) -> Path:
        """The image filesystem the CRI's ImageFsInfo reports."""
        return self.root / "io.containerd.snapshotter.v1.overlayfs"

    # --- configuration ------------------------------------------------------------------

    def config(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        runc = self._runc_binary()
        return f"""version = 2
root = "{self.root}"
state = "{self.state}"

[grpc]
  address = "{self.socket_path}"

[debug]
  level = "{self.log_level}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.base_dir / "opt"}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.cni]
  bin_dir = "{self.cni_dir / "bin"}"
  conf_dir = "{self.cni_dir / "conf"}"

[{cri}.registry]
  config_path = "{self.certs_dir}"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  Root = "{self.runc_root}"
"""

    def _runc_binary(self) -> str:
        return find_binary("runc", extra_dirs=["/usr/sbin", "/usr/bin"])

    def add_registry(self, host: str) -> None:
        """Make the plain-HTTP registry at ``host`` reachable (a hosts.toml of its own)."""
        folder = self.certs_dir / host
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(hosts_toml(host))
        if host not in self.registries:
            self.registries.append(host)

    # --- ManagedProcess -----------------------------------------------------------------

    def command(self) -> list[str]:
        return [self._binary or find_binary("containerd"), "--config", str(self.config_path)]

    def prepare(self) -> None:
        for d in (self.base_dir, self.root, self.state, self.runc_root, self.certs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        for host in list(self.registries):
            self.add_registry(host)
        self.after_stop()  # what a killed predecessor left

    def is_ready(self) -> bool:
        return self.socket_path.exists() and cri_answers(self.endpoint)

    def start(self) -> None:
        super().start()
        try:
            if PAUSE_IMAGE not in self.ctr("images", "ls", "-q").stdout.split():
                self.import_image(
                    image_archive(
                        PAUSE_IMAGE, [("pause", sleeper_elf(), 0o755)], entrypoint=["/pause"]
                    )
                )
        except Exception:
            self.stop()
            raise

    def environment(self) -> Mapping[str, str] | None:
        env = dict(os.environ)
        env.pop("CONTAINERD_ADDRESS", None)
        env.pop("CONTAINERD_NAMESPACE", None)
        return env

    def after_stop(self) -> None:
        # Containers first (runc state is ours alone), then the shims, which name our
        # socket on their command line and detach from containerd's session.
        if self.runc_root.is_dir():
            for container_id in self._runc_ids():
                self._runc("kill", container_id, "KILL", check=False)
                self._runc("delete", "--force", container_id, check=False)
        for pid in _pids_mentioning(str(self.socket_path)):
            kill_pid(pid, grace=self.stop_grace)
        _unmount_under(self.base_dir)

    # --- ctr and runc -------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        namespace: str = CRI_NAMESPACE,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this containerd, in ``namespace`` (the CRI's by default)."""
        cmd = [
            find_binary("ctr"),
            "--address",
            str(self.socket_path),
            "--namespace",
            namespace,
            *args,
        ]
        proc = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise CtrCommandError(
                f"`ctr {' '.join(args)}` failed with code {proc.returncode}: "
                f"{proc.stderr.decode(errors='replace').strip()}"
            )
        return subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )

    def import_image(self, archive: bytes, *, namespace: str = CRI_NAMESPACE) -> None:
        self.ctr("images", "import", "-", namespace=namespace, input=archive)

    def images(self, namespace: str = CRI_NAMESPACE) -> set[str]:
        """Names of the images in ``namespace`` (``ctr images ls -q``)."""
        return set(self.ctr("images", "ls", "-q", namespace=namespace).stdout.split())

    def push_image(
        self,
        ref: str,
        size_bytes: int,
        *,
        labels: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        """Build a one-layer image of ``size_bytes`` random bytes as ``ref`` and push it to its
        (plain-HTTP) registry, through a namespace the CRI does not see; nothing stays."""
        stamp = f"{ref}\n{uuid.uuid4()}\n".encode()
        files = [("cedar-image", stamp, 0o755), ("data/random.bin", os.urandom(size_bytes), 0o644)]
        self.import_image(
            image_archive(ref, files, entrypoint=["/cedar-image"], labels=labels),
            namespace=BUILD_NAMESPACE,
        )
        try:
            user = ["--user", f"{auth[0]}:{auth[1]}"] if auth else []
            self.ctr("images", "push", "--plain-http", *user, ref, namespace=BUILD_NAMESPACE)
        finally:
            self.ctr("images", "rm", "--sync", ref, namespace=BUILD_NAMESPACE, check=False)

    def _runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self._runc_binary(), "--root", str(self.runc_root / CRI_NAMESPACE), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise CtrCommandError(f"`runc {' '.join(args)}` failed: {proc.stderr.strip()}")
        return proc

    def _runc_ids(self) -> list[str]:
        if not (self.runc_root / CRI_NAMESPACE).is_dir():
            return []
        with contextlib.suppress(CtrCommandError, OSError, subprocess.TimeoutExpired):
            return self._runc("list", "-q").stdout.split()
        return []
