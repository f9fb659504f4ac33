"""internvl-chat without a server: argument mapping, usage errors, a port where nothing listens."""

import io
import socket
import subprocess
import sys

import pytest

from internvl_client.cli import build_parser, generation_config_from_args, main


def cfg(*argv):
    return generation_config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_are_greedy():
    assert cfg() == {"do_sample": False}


def test_flags_map_to_card_words():
    assert cfg("--max-new-tokens", "32", "--repetition-penalty", "1.1", "--seed", "3", "--stop", "##", "--stop", "!!") == {
        "max_new_tokens": 32, "do_sample": False, "repetition_penalty": 1.1, "seed": 3, "stop": ["##", "!!"],
    }


def test_temperature_implies_sampling():
    assert cfg("--temperature", "0.7", "--top-p", "0.9", "--top-k", "5") == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
    }
    assert cfg("--temperature", "0") == {"do_sample": False}
    assert cfg("--do-sample") == {"do_sample": True}


def test_contradictions_are_usage_errors(capsys):
    with pytest.raises(ValueError):
        cfg("--top-p", "0.5")
    with pytest.raises(SystemExit) as exc:
        main(["--do-sample", "--temperature", "0", "-q", "x"])
    assert exc.value.code == 2
    assert "contradicts" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_unavailable_server_fails_fast_with_a_clear_message():
    err = io.StringIO()
    code = main(["--url", f"127.0.0.1:{_closed_port()}", "-q", "hello"], out=io.StringIO(), err=err)
    assert code == 3  # unavailable (refused), not a deadline that ran out (a hang)
    assert "server unavailable" in err.getvalue() and "Connection refused" in err.getvalue()


def test_missing_image_file_is_a_usage_error(tmp_path):
    err = io.StringIO()
    code = main(["-q", "x", "--image", str(tmp_path / "missing.png")], out=io.StringIO(), err=err)
    assert code == 2 and "image file not found" in err.getvalue()


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "internvl_client.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout and "/reset" in out.stdout
