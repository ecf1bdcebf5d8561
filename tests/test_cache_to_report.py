"""`build --cache-to` says what it does: a line per entry it pushes, and one summary
line (entries pushed, bytes, skipped because already there) (issue 26)."""
import re
import subprocess
import sys
import textwrap


def test_cache_to_reports_each_push_and_one_summary_line(storage, busybox_oci, tmp_path):
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent(f"""
        one:
          from:
            type: oci
            url: {busybox_oci}
          run: head -c 300000 /dev/urandom > /blob
        two:
          from:
            type: built
            tag: one
          run: touch /two
        """))
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "stacker_kernel", "--storage", str(storage), "build", "-f", str(yaml),
            "--no-oci", "--cache-to", f"oci:{cache}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("[cache-to: pushing step of layer") == 2
    assert "[cache-to: pushed " in first.stdout
    summary = [line for line in first.stdout.splitlines() if line.startswith("cache-to ")]
    assert len(summary) == 1
    m = re.fullmatch(rf"cache-to oci:{re.escape(str(cache))}: 2 entries pushed \(([\d.]+) (KiB|MiB)\), "
                     r"0 skipped \(already there\)", summary[0])
    assert m, summary
    assert float(m.group(1)) * (1024 if m.group(2) == "KiB" else 1 << 20) > 290_000  # the 300 kB blob went
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "[cache-to: pushing" not in again.stdout
    assert f"cache-to oci:{cache}: 0 entries pushed (0 B), 2 skipped (already there)" in again.stdout
