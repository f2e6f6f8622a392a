"""A real nats-server running Cedar's own deploy/nats/accounts.conf, and what it refused.

Shared by the permission table (tests/deploy/test_nats_permissions.py) and the bad-input
tests against the real consumers (tests/chaos/test_fuzz_consumers.py). The server's log
names the user of every refused publish and subscription, which is how the tests tell
what was refused to whom.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import find_binary

REPO = Path(__file__).resolve().parents[2]
ACCOUNTS = REPO / "deploy" / "nats" / "accounts.conf"
USERS = ("watcher", "puller", "mcs-allocator", "ops")
PASSWORD_VARIABLES = {
    "watcher": "WATCHER_PASSWORD",
    "puller": "PULLER_PASSWORD",
    "mcs-allocator": "MCS_ALLOCATOR_PASSWORD",
    "ops": "OPS_PASSWORD",
}
# Each service's inbox prefix (cedar.runtime.bus.Bus.inbox_prefix, cedar.ops.natsio).
INBOX = {
    "watcher": "_INBOX.cedar-watcher",
    "puller": "_INBOX.cedar-puller",
    "mcs-allocator": "_INBOX.cedar-mcs-allocator",
    "ops": "_INBOX.cedar-ops",
}
_VIOLATION = re.compile(
    r'"CEDAR/user:(?P<user>[^"]+)" - (?P<kind>Publish|Subscription) Violation'
    r' - Subject "(?P<subject>[^"]+)"'
)


def password(user: str) -> str:
    return f"pw-{user}-chaos"


class AccountsServer(NatsServer):
    """One JetStream server with Cedar's users and permissions (test passwords)."""

    def command(self) -> list[str]:
        conf_dir = self.store_dir.parent
        shutil.copy(ACCOUNTS, conf_dir / "accounts.conf")
        (conf_dir / "passwords.conf").write_text(
            "".join(f'{PASSWORD_VARIABLES[u]}: "{password(u)}"\n' for u in USERS)
        )
        (conf_dir / "server.conf").write_text(
            f'server_name: "{self.server_name}"\n'
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
            "include ./accounts.conf\n"
        )
        return [find_binary("nats-server"), "-c", str(conf_dir / "server.conf")]

    def mark(self) -> int:
        """Where the log ends now: `refusals(since=...)` reads only what comes after."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def refusals(self, since: int = 0) -> set[Refusal]:
        with self.log_path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return {
            Refusal(m["user"], "publish" if m["kind"] == "Publish" else "subscribe", m["subject"])
            for m in _VIOLATION.finditer(text)
        }


@dataclass(frozen=True, order=True)
class Refusal:
    user: str
    action: str  # "publish" or "subscribe"
    subject: str


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    ptoks, stoks = pattern.split("."), subject.split(".")
    for i, ptok in enumerate(ptoks):
        if ptok == ">":
            return len(stoks) > i
        if i >= len(stoks) or (ptok != "*" and ptok != stoks[i]):
            return False
    return len(ptoks) == len(stoks)


def conf_permissions() -> dict[str, dict[str, list[str]]]:
    """user -> {"publish_allow", "publish_deny", "subscribe_allow"}: the subjects
    deploy/nats/accounts.conf lists, read from its text (comments dropped)."""
    text = "\n".join(line.split("#", 1)[0] for line in ACCOUNTS.read_text().splitlines())
    out: dict[str, dict[str, list[str]]] = {}
    for chunk in re.split(r"\buser:\s*", text)[1:]:
        user = chunk.split(None, 1)[0].strip()
        entry = {"publish_allow": [], "publish_deny": [], "subscribe_allow": []}
        publish = re.search(r"publish:\s*\{(.*?)\}\s*subscribe:", chunk, re.S)
        subscribe = re.search(r"subscribe:\s*\{(.*?)\}", chunk, re.S)
        if publish:
            for kind in ("allow", "deny"):
                found = re.search(kind + r":\s*\[(.*?)\]", publish.group(1), re.S)
                if found:
                    entry[f"publish_{kind}"] = re.findall(r'"([^"]+)"', found.group(1))
        if subscribe:
            found = re.search(r"allow:\s*\[(.*?)\]", subscribe.group(1), re.S)
            if found:
                entry["subscribe_allow"] = re.findall(r'"([^"]+)"', found.group(1))
        out[user] = entry
    return out
