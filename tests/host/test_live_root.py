"""A bind mount of / (what the node agent sees at /host) is the live kernel: NIC coalescing goes over
netlink and block queues get the kernel's sysfs format there, exactly as at /.

Runs in a private mount namespace (``unshare -m``) so the rbind never shows outside this test; the
loop device is the test's own and is restored (its scheduler) and detached in ``finally``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount namespaces, loop devices, sysfs writes"),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("losetup") is None,
                       reason="util-linux unshare/losetup not installed"),
]

CHILD = r'''
import json, pathlib, subprocess, sys
from agentlat.operator.model import host
from agentlat.tuners import blk, nic
from agentlat.tuners.kernel import ethtool, hostfs

mnt, dev = pathlib.Path(sys.argv[1]), sys.argv[2]
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "--rbind", "/", str(mnt)], check=True)
model = host.read(mnt)
eth0 = model.netdevs["eth0"].coalesce
rx = ethtool.get_coalesce("eth0")["rxUsecs"]
nic.TUNER.write(mnt, "ethtool/eth0/rxUsecs", str(rx))  # a tree has no netlink: only the kernel path succeeds
target = f"sys/block/{dev}/queue/scheduler"
blk.TUNER.write(mnt, target, "mq-deadline")  # the kernel takes a bare name, never "[none] mq-deadline"
print(json.dumps({"live": hostfs.is_live(mnt), "coalesce": eth0, "netlink": ethtool.get_coalesce("eth0"),
                  "scheduler": blk.TUNER.read(mnt, target), "model_sched": model.blockdevs[dev].scheduler}))
'''


@pytest.fixture
def loop_device(tmp_path: pathlib.Path) -> Iterator[str]:
    backing = tmp_path / "loop.img"
    with backing.open("wb") as stream:
        stream.truncate(16 << 20)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    name = pathlib.Path(dev).name
    scheduler = pathlib.Path(f"/sys/block/{name}/queue/scheduler")
    scheduler.write_text("none")
    try:
        yield name
    finally:
        scheduler.write_text("none")
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_bind_mount_of_root_is_live(tmp_path: pathlib.Path, loop_device: str) -> None:
    mnt = tmp_path / "host"
    mnt.mkdir()
    before = pathlib.Path(f"/sys/block/{loop_device}/queue/scheduler").read_text()
    assert before.startswith("[none]")
    done = subprocess.run(["unshare", "-m", sys.executable, "-c", CHILD, str(mnt), loop_device],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["live"] is True
    assert seen["coalesce"] == seen["netlink"] and seen["coalesce"]  # read over netlink, not from a JSON file
    assert seen["model_sched"] == "none"
    assert "[mq-deadline]" in seen["scheduler"]
    assert "[mq-deadline]" in pathlib.Path(f"/sys/block/{loop_device}/queue/scheduler").read_text()
    assert not os.listdir(mnt)  # the rbind lived only in the child's mount namespace
