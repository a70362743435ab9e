"""A %%gpu cell behaves like the same cell run locally: each point of issue 5, on a real kernel,
a real broker and agent, and the sandbox's real IPython shell."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import TOKENS, Kernel


@pytest.fixture(scope="module")
def nb(site):
    """alice's kernel in a notebook folder holding a data file, pointed at the site. The site's
    agent runs alice's cells as her own uid with a private /tmp, so her notebook folder is one
    that uid may use (as a shared home would be), not pytest's root-only temporary folder, nor
    /tmp or /var/tmp (each sandbox has its own)."""
    folder = Path(tempfile.mkdtemp(prefix="gpa-notebook-", dir="/home" if os.geteuid() == 0 else None))
    (folder / "data").mkdir()
    (folder / "data" / "x.csv").write_text("a,b\n1,2\n3,4\n")
    for p in (folder, folder / "data"):
        p.chmod(0o777)
    env = dict(os.environ, GPU_ATTACH_BROKER_URL=site.url, GPU_ATTACH_TOKEN=TOKENS["alice"])
    k = Kernel(env)
    k.ok(f"import os; os.chdir({str(folder)!r})")
    k.folder = folder
    yield k
    k.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _kinds(reply):
    return [(kind, sorted(c.get("data", {})) if "data" in c else c.get("name")) for _, kind, c in reply["outputs"]]


def test_modules_imported_in_a_cell_come_back(nb):
    nb.ok("%%gpu\nimport numpy as np\nfrom math import *")
    assert nb.value("[np.__name__, sqrt(16.0), pi > 3]") == ["numpy", 4.0, True]


def test_in_place_changes_persist(nb):
    nb.ok("data = {'a': 1}\nimport numpy as np\nM = np.arange(10)")
    nb.ok("%%gpu\ndata['e'] = 1.25\nM[M > 5] = 0")
    assert nb.value("data") == {"a": 1, "e": 1.25}
    assert nb.value("M.tolist()") == [0, 1, 2, 3, 4, 5, 0, 0, 0, 0]


def test_aliases_and_identity_survive_both_ways(nb):
    nb.ok("import numpy as np\na = np.zeros(3)\nalias_here = a")
    nb.ok("%%gpu\nb = a\nb[0] = 7")
    assert nb.value("[a is b, float(a[0]), alias_here is a]") == [True, 7.0, True]


def test_bare_last_expression_is_out(nb):
    reply = nb.ok("%%gpu\nw = 5\nw")
    results = [c for _, kind, c in reply["outputs"] if kind == "execute_result"]
    assert len(results) == 1 and results[0]["data"]["text/plain"] == "5"
    assert results[0]["execution_count"] == reply["execution_count"]
    assert nb.value(f"Out[{reply['execution_count']}]") == 5
    quiet = nb.ok("%%gpu\nw;")
    assert not [1 for _, kind, _ in quiet["outputs"] if kind == "execute_result"]


def test_rich_display_keeps_its_mime_bundle(nb):
    reply = nb.ok("%%gpu\nfrom IPython.display import HTML, display\ndisplay(HTML('<b>x</b>'))\n"
                  "import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    displays = [c for _, kind, c in reply["outputs"] if kind in ("display_data", "execute_result")]
    assert displays[0]["data"]["text/html"] == "<b>x</b>"
    assert "<table" in displays[1]["data"]["text/html"]


def test_update_display_and_clear_output(nb):
    reply = nb.ok("%%gpu\nfrom IPython.display import display, clear_output\n"
                  "h = display('one', display_id=True)\nh.update('two')\nclear_output()\nprint('after')")
    kinds = [kind for _, kind, _ in reply["outputs"]]
    assert "display_data" in kinds and "stream" in kinds


def test_figures_show_once_as_locally(nb):
    reply = nb.ok("%%gpu\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert [k for k in _kinds(reply) if k[0] == "display_data"] == [("display_data", ["image/png", "text/plain"])]
    # Open at the end of the cell: shown once, even though two names hold it.
    reply = nb.ok("%%gpu\nfig, ax = plt.subplots()\nax.plot([3, 2, 1]);")
    assert len([1 for _, kind, c in reply["outputs"] if kind == "display_data" and "image/png" in c["data"]]) == 1
    assert nb.value("ax.figure is fig") is True
    nb.ok("%%gpu\nplt.style.use('ggplot')")
    assert nb.value("__import__('json').loads('1')") == 1
    reply = nb.ok("%%gpu\nimport matplotlib\nprint(matplotlib.rcParams['axes.facecolor'])")
    assert reply["stdout"].strip() == "#E5E5E5"  # the style set by an earlier %%gpu cell applies


def test_ipython_syntax_runs(nb):
    nb.ok("import numpy as np\nbig = np.arange(1000)")
    reply = nb.ok("%%gpu\n%timeit -n 2 -r 2 big.sum()\n!echo shell says $big.size")
    assert "per loop" in reply["stdout"] and "shell says 1000" in reply["stdout"]
    reply = nb.ok("%%gpu\n%%timeit -n 1 -r 1\nbig.sum()")
    assert "per loop" in reply["stdout"]


def test_relative_paths_are_the_notebooks(nb):
    nb.ok("%%gpu\nimport pandas as pd\ndf = pd.read_csv('data/x.csv')\ndf.to_csv('written.csv')")
    assert nb.value("int(df['b'].sum())") == 6
    assert (nb.folder / "written.csv").exists()


def test_unpicklable_names_stay_remote_and_are_usable(nb):
    reply = nb.ok("%%gpu\nimport threading\ngen = (i * i for i in range(5))\nlk = threading.Lock()")
    assert "stays in this session's sandbox" in reply["stderr"]
    reply = nb.ok("%%gpu\nprint(next(gen), next(gen), lk.acquire(blocking=False))")
    assert reply["stdout"].strip() == "0 1 True"
    status = nb.ok("%gpu status")["stdout"]
    assert "gen:" in status and "lk:" in status


def test_input_prompts_in_the_notebook(nb):
    replies = []

    def stdin_hook(msg):
        replies.append(msg["content"]["prompt"])
        nb.kc.input("forty-two")

    reply = nb.kc.execute_interactive("%%gpu\nanswer = input('your answer? ')", allow_stdin=True,
                                      stdin_hook=stdin_hook, timeout=60)
    assert reply["content"]["status"] == "ok"
    assert replies == ["your answer? "]
    assert nb.value("answer") == "forty-two"

    def password_hook(msg):
        replies.append((msg["content"]["prompt"], msg["content"]["password"]))
        nb.kc.input("s3cret")

    reply = nb.kc.execute_interactive("%%gpu\nimport getpass\npw = getpass.getpass('pw? ')", allow_stdin=True,
                                      stdin_hook=password_hook, timeout=60)
    assert reply["content"]["status"] == "ok" and replies[-1] == ("pw? ", True)
    assert nb.value("pw") == "s3cret"
    # A frontend that cannot answer (nbclient, say) gets the same error as for a local cell.
    reply = nb.kc.execute_interactive("%%gpu\nnope = input('?')", allow_stdin=False, timeout=60)
    assert reply["content"]["ename"] == "StdinNotImplementedError"


def test_options_help_and_errors(nb):
    assert "--memory SIZE" in nb.ok("%%gpu -h\nx = 1")["stdout"]
    reply = nb.run("%%gpu --memroy 1GiB\nx = 1")
    assert reply["status"] == "error" and "--memroy" in reply["evalue"]
    reply = nb.run("%gpu status --memory 1GiB")
    assert reply["status"] == "error" and "takes no slice options" in reply["evalue"]
    reply = nb.run("%%gpu --pool nowhere\nx = 1")  # only a pool: honoured, not ignored
    assert reply["status"] == "error" and "nowhere" in reply["evalue"]


def test_our_errors_are_one_message_without_frames(nb):
    reply = nb.run("%%gpu --memory 64GiB\nx = 1")
    assert reply["ename"] == "NoCapacity"
    assert len(reply["traceback"]) == 1 and "64 GiB" in reply["traceback"][0]
    reply = nb.run("%%gpu\ndef broken(:\n    pass")
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["traceback"]))
    assert reply["ename"] == "SyntaxError" and "magics.py" not in text and "Cell In[" in text


def test_partial_results_of_a_failing_cell_persist(nb):
    reply = nb.run("%%gpu\nbefore_error = 11\nraise ValueError('boom')")
    assert reply["ename"] == "ValueError"
    assert nb.value("before_error") == 11


def test_unchanged_inputs_are_not_sent_again(nb):
    nb.ok("import numpy as np\nheavy = np.ones(1_000_000)")
    nb.ok("%%gpu\ns1 = float(heavy.sum())")
    status = nb.ok("%gpu status")["stdout"]
    assert "sent heavy" in status
    nb.ok("%%gpu\ns2 = float(heavy.sum())")
    status = nb.ok("%gpu status")["stdout"]
    assert "sent nothing" in status and "already there: heavy" in status
    nb.ok("heavy[0] = 5")  # changed here: sent again
    nb.ok("%%gpu\ns3 = float(heavy.sum())")
    assert "sent heavy" in nb.ok("%gpu status")["stdout"]
    assert nb.value("[s1, s2, s3]") == [1e6, 1e6, 1e6 + 4]


def test_functions_from_earlier_cells_see_current_globals(nb):
    nb.ok("%%gpu\nscale = 2\ndef times(v):\n    return v * scale")
    nb.ok("scale = 10")  # changed locally after the function was defined remotely
    nb.ok("%%gpu\nr = times(3)")
    assert nb.value("r") == 30
    assert nb.value("times(4)") == 40  # and the function came home reading the notebook's globals


def test_stop_button_signal_to_the_process_group(tmp_path):
    """JupyterLab interrupts a kernel by signalling its whole process group: the embedded broker
    and agent must survive it, and the cell must stop within a second."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ATTACH_")}
    env["GPU_ATTACH_STATE_DIR"] = str(tmp_path)
    k = Kernel(env)
    try:
        k.ok("%%gpu\nwarm = 1", timeout=120)
        result = {}

        def run():
            result["reply"] = k.run("%%gpu\nimport time\nfor _ in range(600):\n    time.sleep(0.1)")

        t = threading.Thread(target=run)
        t.start()
        time.sleep(2.0)
        pgid = os.getpgid(k.km.provisioner.process.pid)
        sent = time.monotonic()
        os.killpg(pgid, signal.SIGINT)
        t.join(20)
        assert result["reply"]["ename"] == "KeyboardInterrupt"
        assert result["reply"]["finished"] - sent < 1.5
        k.ok("%%gpu\nafter = 3")  # the embedded pool survived the signal
        assert k.value("after") == 3
    finally:
        k.stop()


def test_output_flood_is_coalesced_and_counted(nb):
    # About 20 MB in well under 10 s: far over what a notebook can take (2 MiB/s here).
    reply = nb.ok("%%gpu\nfor i in range(20000):\n    print('line', i, 'x' * 1000)", timeout=120)
    frames = [c for _, kind, c in reply["outputs"] if kind == "stream" and c["name"] == "stdout"]
    assert len(frames) < 2000, f"{len(frames)} stream messages for one flood: not coalesced"
    assert reply["stdout"].startswith("line 0 x")
    assert len(reply["stdout"]) < 20_000 * 1000
    assert "gpu-attach: dropped" in reply["stderr"] and "characters of output" in reply["stderr"]


def test_a_new_token_takes_effect_without_detach(site):
    env = dict(os.environ, GPU_ATTACH_BROKER_URL=site.url, GPU_ATTACH_TOKEN="wrong-token-0123456789abcdef")
    k = Kernel(env)
    try:
        reply = k.run("%%gpu\nx = 1")
        assert reply["ename"] == "AuthError" and len(reply["traceback"]) == 1
        k.ok(f"import os; os.environ['GPU_ATTACH_TOKEN'] = {TOKENS['alice']!r}")
        k.ok("%%gpu\nx = 2")
        assert k.value("x") == 2
    finally:
        k.stop()


def test_environment_mismatch_is_refused_before_the_cell_runs(nb):
    # The kernel claims numpy 1.x: its pickles would not load on the GPU host's numpy 2.
    nb.ok("import jupyter_gpu_attach.session as _s, jupyter_gpu_attach.connection as _c\n"
          "_real_env = _s.environment\n_s.environment = lambda: dict(_real_env(), numpy='1.26.4')\n"
          "_c.get_session()._env_checked = False")
    try:
        reply = nb.run("%%gpu\nran = True")
        assert reply["ename"] == "EnvironmentMismatch"
        assert "numpy==1.26.4" in reply["evalue"] or "numpy 1.26.4" in reply["evalue"]
        assert nb.value("'ran' in globals()") is False
    finally:
        nb.ok("_s.environment = _real_env")
    nb.ok("%%gpu\nran = True")


def test_a_lost_sandbox_names_the_objects_that_lived_only_there(tmp_path):
    """The agent ends an idle session's sandbox (as it would evict one): what the notebook holds is
    sent again without the user noticing, and what lived only in the sandbox is named."""
    from conftest import Site

    site = Site(tmp_path)
    site.start_broker()
    site.start_agent("evicting", simulate=1, extra=("--sandbox-idle", "1"))
    k = Kernel(dict(os.environ, GPU_ATTACH_BROKER_URL=site.url, GPU_ATTACH_TOKEN=TOKENS["bob"]))
    try:
        k.ok("kept = [1, 2, 3]")
        k.ok("%%gpu\nimport threading\nonly_there = threading.Lock()\ntotal = sum(kept)")
        time.sleep(3.0)  # idle past the limit: the agent ends the sandbox
        reply = k.ok("%%gpu\nagain = sum(kept) + total")
        assert k.value("again") == 12
        assert "what lived only there is gone: only_there" in reply["stderr"]
        reply = k.run("%%gpu\nonly_there.acquire()")
        assert reply["ename"] == "RemoteStateLost" and "only_there" in reply["evalue"]
    finally:
        k.stop()
        site.stop()


def test_a_full_pool_queues_the_cell_and_shows_its_place(nb, site):
    with site.client("bob") as c:  # bob holds every GPU of the site
        held = [c.post("/v1/leases", json={"gpus": 1, "session": "nb-bob", "label": "hog"}).json()
                for _ in site.pool()["gpus"]]
    assert all(h.get("state") == "granted" for h in held), held
    result = {}

    def run():
        result["reply"] = nb.run("%%gpu --wait 60\nqueued_then_ran = 1", timeout=90)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(3.0)
    with site.client("bob") as c:
        for h in held:
            c.delete(f"/v1/leases/{h['id']}")
    t.join(60)
    reply = result["reply"]
    assert reply["status"] == "ok", reply
    shown = [c for _, kind, c in reply["outputs"] if kind in ("display_data", "update_display_data")]
    texts = [c["data"]["text/plain"] for c in shown]
    assert texts and "queued: position 1 of 1" in texts[0], texts
    assert nb.value("queued_then_ran") == 1

    with site.client("bob") as c:
        held = [c.post("/v1/leases", json={"gpus": 1, "session": "nb-bob", "label": "hog"}).json()
                for _ in site.pool()["gpus"]]
    try:
        t0 = time.monotonic()
        reply = nb.run("%%gpu --wait 1\nnever = 1")
        assert reply["ename"] == "NoCapacity" and "--wait" in reply["evalue"], reply["evalue"]
        assert time.monotonic() - t0 < 15
    finally:
        with site.client("bob") as c:
            for h in held:
                c.delete(f"/v1/leases/{h['id']}")
