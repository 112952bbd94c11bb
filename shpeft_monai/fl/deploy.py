"""Hospital-side deployment of federated SH-PEFT: SuperLink + N SuperNodes, TLS and node authentication.

``python -m shpeft_monai.fl.deploy --workdir runs/fed-deploy --supernodes 2`` does, on one machine (loopback),
what a real deployment does on several:

1. ``certs``: a CA and a SuperLink certificate (SAN ``localhost``, ``127.0.0.1`` and ``--host``),
   ECDSA P-384 key pairs (OpenSSH format) for every SuperNode;
2. a ``$FLWR_HOME/config.toml`` connection ``shpeft`` (address + CA certificate) for the ``flwr`` CLI;
3. ``flower-superlink`` with TLS and ``--enable-supernode-auth`` (runtime dependency installation off);
4. ``flwr supernode register <public key> shpeft`` for each site (unregistered nodes are refused);
5. one ``flower-supernode`` per site with ``--root-certificates``, its private key and
   ``--node-config 'dataset=... checkpoint=...'`` pointing at that site's own data and weights;
6. ``flwr run federated shpeft`` and a wait until the run has finished; then every process group is
   ended (each process is started in its own session). When a node config names a ``fault``
   (a drill), the run uses a copy of the app whose ClientApp carries the fault-drill mod
   (:data:`shpeft_monai.fl.faults.drill_app`); the production app never does.

The per-site datalists written by ``--demo-data`` come from the Br35H training/validation split
(grouped, label-skewed); in a real hospital each site writes its own JSON datalist.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from shpeft_monai.io import FEDERATED_REPORT_FILE

__all__ = ["Deployment", "free_port", "make_certificates", "make_node_keys", "write_flwr_config"]

REPO = Path(__file__).resolve().parents[2]
CONNECTION = "shpeft"


def flwr_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",  # logs reach their files as they are written
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ credentials
def make_certificates(
    out: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365
) -> dict[str, Path]:
    """A CA and a server certificate signed by it (SAN: ``hosts``); PEM files under ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("shpeft federated CA"))
        .issuer_name(name("shpeft federated CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(paths["key"], 0o600)
    return paths


def make_node_keys(out: Path, n: int) -> list[tuple[Path, Path]]:
    """ECDSA P-384 key pairs in OpenSSH format, one per SuperNode: [(private, public.pub)]."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP384R1())
        priv, pub = out / f"node{i}", out / f"node{i}.pub"
        priv.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        os.chmod(priv, 0o600)
        pub.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" shpeft-node{i}\n".encode()
        )
        pairs.append((priv, pub))
    return pairs


def write_flwr_config(flwr_home: Path, address: str, ca: Path, name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` with one TLS connection to the SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n'
    )
    return path


def demo_datalists(
    out: Path, n: int, *, train_per_site: int = 0, val_per_site: int = 0, seed: int = 0
) -> list[Path]:
    """One bundle datalist per site from the Br35H split (grouped, label-skewed): a stand-in for
    the lists each hospital writes for its own images."""
    from shpeft_monai.fl.partition import site_datalists

    return site_datalists(out, n, train_per_site=train_per_site, val_per_site=val_per_site, seed=seed)


# ------------------------------------------------------------------------------------------ processes
@dataclass
class Deployment:
    """Processes of one loopback deployment; use as a context manager so everything is ended."""

    workdir: Path
    n_nodes: int = 2
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    drills: bool = False  # a node config names a fault: run the drill copy of the app
    _logs: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).absolute()
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = flwr_env(self.flwr_home)
        self.certs = make_certificates(self.workdir / "certs")
        self.keys = make_node_keys(self.workdir / "keys", self.n_nodes + 1)  # the last one stays unregistered
        write_flwr_config(self.flwr_home, self.address, self.certs["ca"])

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace") if p.is_file() else ""

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_superlink(self) -> None:
        self._start(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile", str(self.certs["ca"]),
                "--ssl-certfile", str(self.certs["cert"]),
                "--ssl-keyfile", str(self.certs["key"]),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--database", str(self.workdir / "superlink.db"),
            ],
        )  # fmt: skip
        self.wait_for(lambda: self._port_open(self.port), 60, "superlink")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def wait_for(self, cond: Any, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None and n.startswith("superlink")]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.log(dead[0])[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def register(self, i: int) -> subprocess.CompletedProcess:
        res = self.cli("supernode", "register", str(self.keys[i][1]), CONNECTION)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed:\n{res.stdout}\n{res.stderr}")
        return res

    def start_supernode(
        self, i: int, node_config: dict[str, Any], *, name: str | None = None
    ) -> subprocess.Popen:
        """Start the SuperNode of key pair ``i``; call it again with a new ``name`` to restart a
        killed one: same private key, so the SuperLink gives it back the same node id."""
        name = name or f"supernode{i}"
        self.drills = self.drills or bool(node_config.get("fault"))
        node_config = {"work-dir": str(self.workdir / "sites" / name), **node_config}
        if name in self.procs:
            raise ValueError(f"{name!r} was started already: restart it under a new name")
        items = " ".join(
            f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in node_config.items()
        )
        return self._start(
            name,
            [
                "flower-supernode",
                "--superlink", self.address,
                "--root-certificates", str(self.certs["ca"]),
                "--auth-supernode-private-key", str(self.keys[i][0]),
                "--port", str(free_port()),
                "--max-retries", "5",
                "--node-config", items,
            ],
        )  # fmt: skip

    def drill_app(self) -> Path:
        """A copy of the app manifest whose ClientApp carries the fault-drill mod."""
        app = self.workdir / "drill-app"
        app.mkdir(parents=True, exist_ok=True)
        text = (REPO / "federated" / "pyproject.toml").read_text()
        text = text.replace("shpeft_monai.fl.client_app:app", "shpeft_monai.fl.faults:drill_app")
        (app / "pyproject.toml").write_text(
            text.replace('name = "shpeft-federated"', 'name = "shpeft-drill"')
        )
        return app

    def run(self, run_config: dict[str, Any], app: Path | None = None) -> int:
        """``flwr run`` the app (the drill copy when a node drills); returns the run id."""
        app = app or (self.drill_app() if self.drills else REPO / "federated")
        items = [
            f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in run_config.items()
        ]
        args = ["run", str(app), CONNECTION, "--format", "json"]
        for item in items:
            args += ["--run-config", item]
        res = self.cli(*args, timeout=300)
        text = res.stdout.strip()
        try:
            payload = json.loads(text[text.index("{") :])
        except ValueError as exc:
            raise RuntimeError(f"flwr run failed ({res.returncode}):\n{res.stdout}\n{res.stderr}") from exc
        if not payload.get("success", True) or "run-id" not in payload:
            raise RuntimeError(f"flwr run failed: {payload}\n{res.stderr}")
        return int(payload["run-id"])

    def follow(self, run_id: int, name: str = "serverapp") -> subprocess.Popen:
        """Stream the run's ServerApp log (``flwr log --stream``) into ``logs/<name>.log``."""
        return self._start(name, ["flwr", "log", str(run_id), CONNECTION, "--stream"])

    def status(self, run_id: int) -> str:
        res = self.cli("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        try:
            text = res.stdout
            runs = json.loads(text[text.index("{") :]).get("runs", [])
            return str(runs[0].get("status", "")) if runs else ""
        except (ValueError, IndexError):
            return ""

    def wait_run(self, run_id: int, timeout: float) -> str:
        end = time.monotonic() + timeout
        status = ""
        while time.monotonic() < end:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(3)
        raise TimeoutError(f"run {run_id} did not finish in {timeout}s (last status {status!r})")

    def stop(self) -> None:
        """End every process group (SuperNodes spawn ClientApp processes that outlive a plain kill)."""
        for proc in self.procs.values():  # the whole group, even when its leader has exited already
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, end - time.monotonic()))
        for proc in self.procs.values():  # the group may hold children even after its leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        end = time.monotonic() + 15
        while self.alive_groups() and time.monotonic() < end:
            time.sleep(0.2)
        for f in self._logs:
            f.close()

    def kill(self, name: str, timeout: float = 15) -> None:
        """SIGKILL the whole process group of ``name`` (a crash or a power cut: no cleanup, no
        goodbye to the SuperLink) and wait until the group is gone; ``stop()`` still covers it."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)  # reap the leader: a zombie would still count as a group member
        self.wait_for(lambda: name not in self.alive_groups(), timeout, f"the end of {name}")

    def alive_groups(self) -> list[str]:
        """Names of the started processes whose process group still has a member."""
        alive = []
        for name, proc in self.procs.items():
            try:
                os.killpg(proc.pid, 0)
                alive.append(name)
            except ProcessLookupError:
                pass
            except PermissionError:
                alive.append(name)
        return alive


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/fed-deploy")
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--checkpoint", default="", help="local weights file of every node (default: converted cache)"
    )
    p.add_argument("--train-per-site", type=int, default=48)
    p.add_argument("--val-per-site", type=int, default=32)
    p.add_argument("--run-config", action="append", default=[], help="extra k=v run-config items")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    workdir = Path(args.workdir).absolute()
    lists = demo_datalists(
        workdir / "data", args.supernodes, train_per_site=args.train_per_site, val_per_site=args.val_per_site
    )
    with Deployment(workdir, args.supernodes, args.port) as d:
        d.start_superlink()
        for i in range(args.supernodes):
            d.register(i)
            cfg: dict[str, Any] = {"dataset": str(lists[i]), "num-threads": 1}
            if args.checkpoint:
                cfg["checkpoint"] = str(Path(args.checkpoint).absolute())
            d.start_supernode(i, cfg)
        run_cfg: dict[str, Any] = {
            "out": str(workdir / "out"),
            "min-nodes": args.supernodes,
            "overlays": "cpu_demo",
            "account-bytes": True,
        }
        for item in args.run_config:
            k, _, v = item.partition("=")
            try:
                run_cfg[k] = tomllib.loads(f"v = {v}")["v"]
            except tomllib.TOMLDecodeError:
                run_cfg[k] = v
        run_id = d.run(run_cfg)
        print(f"run {run_id} submitted to {d.address}; logs in {d.logs}", flush=True)
        print(d.wait_run(run_id, args.timeout))
        report = workdir / "out" / FEDERATED_REPORT_FILE
        if report.is_file():
            print(
                json.dumps(
                    {
                        k: v
                        for k, v in json.loads(report.read_text()).items()
                        if k in ("k", "accuracy_per_round", "rejected_replies")
                    },
                    indent=1,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
