"""Attacks from inside a cell, as a hostile user of a shared agent would try them (issue 6).

Each attack must fail, and the neighbour's (bob's) next cell must then succeed with his state
intact (the ``neighbour_survives`` fixture). The agent runs as root, as the embedded default and
many sites do; each user's cells run as that user's own uid, in a cgroup and a mount namespace.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import TOKENS, pid_alive as _alive
from jupyter_gpu_attach import GPUSession

from gpu_attach_server.agent.jail import private_proc_supported

from .conftest import needs_root, run

pytestmark = [needs_root, pytest.mark.usefixtures("neighbour_survives")]


def test_cells_run_as_their_users_own_unprivileged_uid(alice, bob):
    ns = run(alice, "import os\nuid, gid, groups = os.getuid(), os.getgid(), os.getgroups()")
    assert ns["uid"] >= 60000 and ns["gid"] >= 60000 and ns["groups"] == []
    assert bob.info["uid"] >= 60000 and bob.info["uid"] != ns["uid"]


def test_a_cell_cannot_read_the_agents_environment_or_token(alice, site):
    agent_pid = site.agents["gpu-host-1"].pid
    ns = run(alice, "import os\n"
                    "env_here = {k: v for k, v in os.environ.items() if 'TOKEN' in k}\n"
                    "tries = {}\n"
                    "for what in ('environ', 'cmdline', 'mem', 'fd/0', 'root/proc/self/environ'):\n"
                    "    path = f'/proc/{agent_pid}/{what}'\n"
                    "    try:\n"
                    "        with open(path, 'rb') as f:\n"
                    "            data = f.read(4096)\n"
                    "        tries[what] = 'READ' if (b'TOKEN' in data or what == 'mem') else 'harmless'\n"
                    "    except OSError as e:\n"
                    "        tries[what] = type(e).__name__\n",
             {"agent_pid": agent_pid})
    assert ns["env_here"] == {}
    assert "READ" not in ns["tries"].values(), ns["tries"]
    # Not there at all: the sandbox's own /proc hides other uids' processes (Linux >= 5.8).
    assert ns["tries"]["environ"] == ("FileNotFoundError" if private_proc_supported() else "PermissionError")


def test_a_cell_cannot_read_the_agents_state_or_the_brokers_key_and_database(alice, site):
    targets = [site.tmp / "agent-gpu-host-1" / "agent-ed25519.pem", site.tmp / "agent-gpu-host-1" / "uids.json",
               site.tmp / "broker-ed25519.pem", site.tmp / "broker.sqlite"]
    for t in targets:
        assert t.exists(), f"{t} should exist for this attack to mean anything"
    ns = run(alice, "import os\nresults = {}\n"
                    "for p in paths:\n"
                    "    for path in (p, '/proc/1/root' + p):\n"
                    "        try:\n"
                    "            open(path, 'rb').read(16)\n"
                    "            results[path] = 'READ'\n"
                    "        except OSError as e:\n"
                    "            results[path] = type(e).__name__\n",
             {"paths": [str(t) for t in targets]})
    assert "READ" not in ns["results"].values(), ns["results"]


def test_a_cell_cannot_read_another_users_files_or_memory(alice, bob):
    ns = run(alice, "import os\nresults = {}\n"
                    "for path in (home + '/secret.txt', home, f'/proc/{pid}/mem', f'/proc/{pid}/environ',\n"
                    "             f'/proc/{pid}/maps', f'/proc/{pid}/root/etc/hostname'):\n"
                    "    try:\n"
                    "        if os.path.isdir(path):\n"
                    "            results[path] = 'LISTED %s' % os.listdir(path)\n"
                    "        else:\n"
                    "            with open(path, 'rb') as f:\n"
                    "                f.read(64)\n"
                    "            results[path] = 'READ'\n"
                    "    except OSError as e:\n"
                    "        results[path] = type(e).__name__\n",
             {"home": bob.info["home"], "pid": bob.info["pid"]})
    leaked = {k: v for k, v in ns["results"].items() if not v.endswith("Error")}
    assert not leaked, leaked


@pytest.mark.skipif(not private_proc_supported(), reason="a /proc of its own per mount needs Linux 5.8")
def test_a_cell_sees_only_its_own_users_processes(alice, bob, site):
    """Command lines can carry secrets: a cell's /proc lists only its own uid's processes, so
    neither the agent (root) nor bob's sandbox is there, by listing or by pid; its own are."""
    agent_pid = site.agents["gpu-host-1"].pid
    ns = run(alice, "import os, subprocess, time\n"
                    "child = subprocess.Popen(['sleep', '5'])\n"
                    "r, w = os.pipe()\n"
                    "forked = os.fork()\n"
                    "if forked == 0:  # a forked child (no exec) sees its parent, the sandbox\n"
                    "    os.write(w, b'1' if os.path.exists(f'/proc/{os.getppid()}/cmdline') else b'0')\n"
                    "    time.sleep(5)\n"
                    "    os._exit(0)\n"
                    "saw_parent = os.read(r, 1) == b'1'\n"
                    "listed = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
                    "by_pid = {name: os.path.exists(f'/proc/{pid}/cmdline') for name, pid in\n"
                    "          (('agent', agent_pid), ('bob', bob_pid), ('self', os.getpid()), ('child', child.pid),\n"
                    "           ('forked', forked))}\n"
                    "uids = {os.stat(f'/proc/{p}').st_uid for p in listed}\n"
                    "child.kill(); child.wait(); os.kill(forked, 9); os.waitpid(forked, 0)\n"
                    "me, uid = os.getpid(), os.getuid()\n",
             {"agent_pid": agent_pid, "bob_pid": bob.info["pid"]})
    assert ns["by_pid"] == {"agent": False, "bob": False, "self": True, "child": True, "forked": True}
    assert ns["saw_parent"], "a forked child must see the sandbox that forked it (ps, psutil, /proc/$PPID)"
    assert ns["me"] in ns["listed"] and agent_pid not in ns["listed"] and bob.info["pid"] not in ns["listed"]
    assert ns["uids"] == {ns["uid"]}, "only the cell's own uid's processes are listed"
    # The host's /proc is untouched: the test process still sees both sandboxes.
    assert os.path.exists(f"/proc/{bob.info['pid']}/cmdline") and os.path.exists(f"/proc/{agent_pid}/cmdline")


def test_a_cell_cannot_signal_the_agent_or_another_users_sandbox(alice, bob, site):
    agent_pid = site.agents["gpu-host-1"].pid
    ns = run(alice, "import os, signal\nresults = {}\n"
                    "for name, pid in (('agent', agent_pid), ('bob', bob_pid), ('bob-group', -bob_pid)):\n"
                    "    for sig in (signal.SIGCONT, signal.SIGSTOP, signal.SIGKILL):\n"
                    "        try:\n"
                    "            os.kill(pid, sig)\n"
                    "            results[f'{name}/{sig.name}'] = 'SENT'\n"
                    "        except OSError as e:\n"
                    "            results[f'{name}/{sig.name}'] = type(e).__name__\n",
             {"agent_pid": agent_pid, "bob_pid": bob.info["pid"]})
    assert "SENT" not in ns["results"].values(), ns["results"]
    assert site.agents["gpu-host-1"].poll() is None


def test_a_forged_grant_is_refused(alice, bob, site):
    """A cell mints a grant for bob's session with a key of its own: the agent refuses it."""
    with site.client("alice") as c:
        address = c.post("/v1/leases", json={"session": "probe", "fraction": 0.1}).json()
    with site.client("alice") as c:
        c.delete(f"/v1/leases/{address['id']}")
    ns = run(alice, "import socket, time\n"
                    "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey\n"
                    "from gpu_attach_server.grant_tokens import GrantSigner\n"
                    "from jupyter_gpu_attach import wire\n"
                    "forged = GrantSigner(Ed25519PrivateKey.generate()).sign({\n"
                    "    'lease': 'L000000000001', 'user': 'bob', 'session': 'bob-nb', 'agent': 'gpu-host-1',\n"
                    "    'gpus': [0], 'uuids': [], 'memory': 1, 'simulated': True, 'exp': time.time() + 60})\n"
                    "host, port = addr.rsplit(':', 1)\n"
                    "with socket.create_connection((host, int(port))) as s:\n"
                    "    wire.send_frame(s, {'op': 'hello', 'token': forged})\n"
                    "    reply = wire.recv_frame(s).header\n",
             {"addr": address["agent"]["address"]})
    assert ns["reply"]["op"] == "reject" and "not the broker's" in ns["reply"]["message"]


def test_a_setsid_child_is_frozen_between_cells_and_dies_with_the_session(alice, site):
    source = ("import os, subprocess, time\n"
              "ticks = os.path.join(os.environ['HOME'], 'ticks')\n"
              "child = subprocess.Popen(['setsid', 'sh', '-c', f'while :; do date +%s.%N >> {ticks}; sleep 0.02; done'],\n"
              "                         start_new_session=True).pid\n"
              "time.sleep(0.3)\nended = time.time()")
    ns = run(alice, source)
    time.sleep(1.0)
    ns2 = run(alice, "import os, time\nnow = time.time()\ntime.sleep(0.3)\n"
                     "seen = [float(t) for t in open(ticks).read().split()]", {"ticks": ns["ticks"]})
    between = [t for t in ns2["seen"] if ns["ended"] + 0.1 < t < ns2["now"] - 0.05]
    assert not between, f"{len(between)} ticks of a setsid child ran while the session held no lease"
    assert any(t > ns2["now"] for t in ns2["seen"]), "the child was alive (and resumed in the next cell)"
    # The child is in alice's cgroup: ending the session kills it, wherever it moved its session.
    pid = ns["child"]  # as the host sees it (the sandbox shares the host's pid namespace)
    alice.broker.end_session(alice.session_id)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "a process a cell started outlived its session"


def test_a_cell_cannot_open_a_gpu_node_outside_its_lease(site):
    """Clearing CUDA_VISIBLE_DEVICES gains nothing: the kernel refuses to open the host's GPU nodes.

    Nodes like the host's /dev/nvidia0..3 (major 195) are made beside the session's working
    directory, in the agent's work root (a cell cannot mknod; its HOME is a disk of its own,
    mounted nodev). No driver backs them here, so an open the fence lets through fails with
    ENXIO, as /dev/nvidiactl's does (on a GPU host, nvidiactl opens); one the fence stops fails with
    EPERM. The devices here are simulated, so this sandbox may open no GPU node at all."""
    import os as host_os

    alice = GPUSession(site.url, TOKENS["alice"], session_id="alice-gpu-nodes")  # a session of its own
    home = run(alice, "import os\nhome = os.environ['HOME']")["home"]
    nodes = host_os.path.join(host_os.path.dirname(home), "alice-gpu-nodes")
    host_os.mkdir(nodes, 0o755)
    for name, minor in [("nvidia0", 0), ("nvidia1", 1), ("nvidia3", 3), ("nvidiactl", 255)]:
        host_os.mknod(f"{nodes}/{name}", 0o20666, host_os.makedev(195, minor))
        host_os.chmod(f"{nodes}/{name}", 0o666)  # past the umask: as the driver makes /dev/nvidia*
    ns = run(alice, "import errno, os\n"
                    "os.environ.pop('CUDA_VISIBLE_DEVICES', None)\n"
                    "got = {}\n"
                    "for name in ('nvidia0', 'nvidia1', 'nvidia3', 'nvidiactl'):\n"
                    "    try:\n"
                    "        os.close(os.open(os.path.join(nodes, name), os.O_RDWR))\n"
                    "        got[name] = 'opened'\n"
                    "    except OSError as e:\n"
                    "        got[name] = errno.errorcode[e.errno]\n", {"nodes": nodes})
    alice.broker.end_session(alice.session_id)
    got = ns["got"]
    assert {k: got[k] for k in ("nvidia0", "nvidia1", "nvidia3")} == dict.fromkeys(("nvidia0", "nvidia1", "nvidia3"), "EPERM")
    assert got["nvidiactl"] in ("ENXIO", "opened"), got  # reached the driver (there is one on a GPU host)


def test_a_fork_bomb_hits_the_pids_limit_and_harms_no_one_else(site):
    alice = GPUSession(site.url, TOKENS["alice"], session_id="alice-bomb")
    ns = run(alice, "import os, time\nforked, error = 0, None\n"
                    "try:\n"
                    "    for _ in range(5000):\n"
                    "        if os.fork() == 0:\n"
                    "            time.sleep(30)\n"
                    "            os._exit(0)\n"
                    "        forked += 1\n"
                    "except OSError as e:\n"
                    "    error = str(e)\n")
    assert ns["forked"] < 64 and "Resource temporarily unavailable" in (ns["error"] or "")
    alice.broker.end_session(alice.session_id)  # and its processes go with the session
    time.sleep(0.5)


SPIN = ("import time\n"
        "def spin(seconds):\n"
        "    n, end = 0, time.perf_counter() + seconds\n"
        "    while time.perf_counter() < end:\n"
        "        n += 1\n"
        "    return n / seconds\n")


def test_a_cpu_hog_takes_its_own_share_not_its_neighbours(bob, site):
    """Six busy processes in one user's cell get that sandbox's share of the CPU, not six
    shares: bob's one-process cell beside them keeps most of its solo speed. (Without a CPU
    group per sandbox, seven runnable processes on this 2-core machine leave bob 2/7 of a core.)"""
    import threading

    solo = run(bob, SPIN + "rate = spin(1.0)")["rate"]
    hog = GPUSession(site.url, TOKENS["alice"], session_id="alice-cpu-hog")
    started = threading.Event()
    hogged: dict = {}

    def hog_cell():
        started.set()
        run(hog, SPIN + "import os\nkids = []\n"
                        "for _ in range(6):\n"
                        "    pid = os.fork()\n"
                        "    if pid == 0:\n"
                        "        os.setsid()  # a session, and so an autogroup, of its own\n"
                        "        spin(4.0)\n"
                        "        os._exit(0)\n"
                        "    kids.append(pid)\n"
                        "for pid in kids:\n"
                        "    os.waitpid(pid, 0)\n", hogged)

    t = threading.Thread(target=hog_cell)
    t.start()
    started.wait()
    time.sleep(1.5)  # the hog's processes are spinning by now
    beside = run(bob, SPIN + "rate = spin(1.0)")["rate"]
    t.join(30)
    hog.broker.end_session(hog.session_id)
    assert "kids" in hogged, "the hog's cell did not finish"
    print(f"bob beside the hog: {beside / solo:.0%} of his solo speed")
    assert beside >= 0.5 * solo, f"bob ran at {beside / solo:.0%} of his solo speed beside a CPU hog"


def test_a_memory_hog_fails_with_an_error_naming_the_limit(alice):
    from jupyter_gpu_attach.errors import GPUAttachError

    with pytest.raises(BaseException) as raised:
        run(alice, "hog = b'x' * (3 << 30)")
    assert "host-memory limit of 1 GiB" in str(raised.value), repr(raised.value)
    assert not isinstance(raised.value, GPUAttachError) or "memory" in str(raised.value)
    ns = run(alice, "after = 'fresh sandbox'")  # the session goes on, in a new sandbox
    assert ns["after"] == "fresh sandbox"


def test_a_disk_filler_fills_only_its_own_home(site):
    """A cell that writes without end fills its own HOME (a disk of its own, --sandbox-disk 64MiB
    here) and gets ENOSPC there; the host's world-writable /var/tmp is a tmpfs of the sandbox's
    own. The host's disk loses nothing once the session ends."""
    isolation = site.ready["gpu-host-1"]["isolation"]
    assert "disk of its own" in isolation, f"this agent gives sandboxes no disk of their own: {isolation}"
    filler = GPUSession(site.url, TOKENS["alice"], session_id="alice-disk")
    ns = run(filler, "import errno, os, uuid\n"
                     "home = os.environ['HOME']\n"
                     "st = os.statvfs(home)\n"
                     "size = st.f_blocks * st.f_frsize\n"
                     "written, error = 0, None\n"
                     "try:\n"
                     "    with open(os.path.join(home, 'fill'), 'wb') as f:\n"
                     "        while written < 256 << 20:\n"
                     "            f.write(b'x' * (1 << 20))\n"
                     "            f.flush()\n"
                     "            os.fsync(f.fileno())\n"
                     "            written += 1 << 20\n"
                     "except OSError as e:\n"
                     "    error = errno.errorcode[e.errno]\n"
                     "marker = 'gpa-' + uuid.uuid4().hex\n"
                     "open(os.path.join('/var/tmp', marker), 'w').write('x')\n")
    image = os.path.join(os.path.dirname(ns["home"]), ".disks", os.path.basename(ns["home"]) + ".img")
    assert os.path.exists(image), image
    used_on_host = os.stat(image).st_blocks * 512
    with pytest.raises(OSError) as full:  # uncaught, the error says which limit it hit and what to do
        run(filler, "with open(os.path.join(home, 'more'), 'wb') as f:\n    f.write(b'x' * (4 << 20))\n", ns)
    assert "--sandbox-disk" in "".join(getattr(full.value, "__notes__", [])), full.value
    filler.broker.end_session(filler.session_id)
    assert ns["error"] == "ENOSPC", ns
    assert 48 << 20 <= ns["written"] <= 64 << 20, ns["written"]
    assert 48 << 20 <= ns["size"] <= 64 << 20, ns["size"]
    assert used_on_host <= 72 << 20, f"the image takes {used_on_host >> 20} MiB of the host's disk"
    assert not os.path.exists(os.path.join("/var/tmp", ns["marker"])), "the cell wrote to the host's /var/tmp"
    deadline = time.monotonic() + 10
    while os.path.exists(image) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(image), "the session's disk outlived its sandbox"


def _sysv_segments_of(uid: int) -> list[str]:
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return [r[1] for r in rows if len(r) > 7 and r[7] == str(uid)]


def test_ipc_objects_a_cell_makes_go_with_its_sandbox(site):
    """A System V shared-memory segment outlives the process that made it, until someone removes
    it: a cell's would outlive its lease and its sandbox, holding host memory for good. Each
    sandbox has an IPC namespace of its own, and what is in it goes when the sandbox does."""
    s = GPUSession(site.url, TOKENS["alice"], session_id="alice-ipc")
    ns = run(s, "import ctypes, os\n"
                "libc = ctypes.CDLL(None, use_errno=True)\n"
                "libc.shmat.restype = ctypes.c_void_p\n"
                "shmid = libc.shmget(0, 8 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600\n"
                "addr = libc.shmat(shmid, None, 0)\n"
                "ctypes.memset(addr, 1, 8 << 20)\n"
                "libc.shmdt(ctypes.c_void_p(addr))\n"
                "uid, pid = os.getuid(), os.getpid()\n")
    assert ns["shmid"] >= 0
    try:
        s.broker.end_session(s.session_id)
        deadline = time.monotonic() + 10
        while _alive(ns["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(ns["pid"])
        left = _sysv_segments_of(ns["uid"])
        assert not left, f"shared-memory segment(s) {left} of the cell's uid outlived its sandbox"
    finally:
        for shmid in _sysv_segments_of(ns["uid"]):  # what a failed run left: not for the next test
            subprocess.run(["ipcrm", "-m", shmid], check=False)
