"""Protocol conformance of the stacker kernel, checked by jupyter_kernel_test.

Every message is validated against the message spec. The kernel serves a
notebook whose base is a busybox rootfs, so cells really run in the
container. Tests of features a build kernel does not have are removed from
the class (set to None) rather than skipped:

- stderr: a step runs on a pty, which merges the step's stdout and stderr
  into one stream (as a terminal shows them), so all step output arrives as
  `stdout`; jupyter_kernel_test's test_execute_stderr cannot pass and is off.
- execute_result, history, pager, clear_output: a shell build step has no
  result value, the kernel keeps no history, has no pager and clears nothing.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jupyter_kernel_test

from conftest import _busybox_rootfs_tar
from kernel_support import install_spec, notebook_dir, start_kernel


class TestStackerKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "stacker"
    language_name = "stacker"
    file_extension = ".sh"

    code_hello_world = 'echo "hello, world"'
    code_generate_error = "false"
    code_display_data = [{"code": "%help", "mime": "text/html"},
                         {"code": "%layers", "mime": "text/plain"}]
    code_inspect_sample = "%rollback"
    completion_samples = [
        {"text": "%rollb", "matches": {"%rollback"}},
        {"text": "%from sc", "matches": {"scratch"}},
        {"text": "%network n", "matches": {"none"}},
    ]
    complete_code_samples = ["echo hi", "if true; then echo yes; fi", "%layers",
                             "cat <<EOF\nbody\nEOF"]
    incomplete_code_samples = ['echo "open', "if true; then", "for x in a b; do",
                               "cat <<EOF\nbody", "echo \\"]
    invalid_code_samples = ["fi", "echo )", "%no_such_magic"]

    # Not features of a build kernel (see the module docstring); removed, not skipped.
    test_execute_stderr = None
    test_execute_result = None
    test_history = None
    test_pager = None
    test_clear_output = None

    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = Path(tempfile.mkdtemp(prefix="stacker-conformance-"))
        kernels = install_spec(cls.tmp / "jupyter")
        tar = _busybox_rootfs_tar(cls.tmp / "busybox-src.tar")
        nbdir = notebook_dir(cls.tmp / "nb", tar)
        cls.kernel = start_kernel(nbdir / "conformance.ipynb", kernels)
        cls.km, cls.kc = cls.kernel.km, cls.kernel.kc
        base = cls.kernel.execute("%from tar busybox.tar", timeout=120)
        assert base.status == "ok", base.error

    @classmethod
    def tearDownClass(cls) -> None:
        cls.kernel.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_kernel_info_advertises_neither_debugger_nor_subshells(self) -> None:
        self.flush_channels()
        self.kc.kernel_info()
        reply = self.kc.get_shell_msg(timeout=15)
        features = reply["content"].get("supported_features", [])
        self.assertNotIn("debugger", features)
        self.assertNotIn("kernel subshells", features)
        self.assertEqual(reply["content"]["language_info"]["name"], "stacker")
