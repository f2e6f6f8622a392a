"""Where each part of the one `cedar` import package lives (docs/architecture.md).

Static metadata is in pyproject.toml. Only the package folders present are built: the
production image's build context leaves out sandbox/ (.dockerignore), so the image carries
no simulated API and no private servers, while a checkout installs everything.
"""

from pathlib import Path

from setuptools import setup

# import package -> folder, from the top layer down
PACKAGE_DIRS = {
    "cedar": "cli/cedar",
    "cedar.cli": "cli/cedar/cli",
    "cedar.ops": "ops/cedar/ops",
    "cedar.sandbox": "sandbox/cedar/sandbox",
    "cedar.watcher": "services/watcher/cedar/watcher",
    "cedar.puller": "services/puller/cedar/puller",
    "cedar.puller.cri": "services/puller/cedar/puller/cri",
    "cedar.mcs_allocator": "services/mcs-allocator/cedar/mcs_allocator",
    "cedar.nats_auth": "services/nats-auth/cedar/nats_auth",
    "cedar.runtime": "runtime/cedar/runtime",
    "cedar.proto": "proto/cedar/proto",
}

here = Path(__file__).parent
present = {name: path for name, path in PACKAGE_DIRS.items() if (here / path).is_dir()}
setup(package_dir=present, packages=list(present))
