"""The files that repeat the contract, generated from its declaration (serving/contract.py).

Owns: the text of every generated copy of the generation inputs and the input table: the blocks between
`# <generated:KEY>` / `# </generated:KEY>` markers in the model_repository/*/config.pbtxt files (input
lists and the ensemble's maps), the table between `<!-- contract-table:begin/end -->` in README.md and
docs/contract.md (and docs/contract.md's table of each input's other names), and the whole of client/internvl_client/contract_inputs.py (the SDK must not import
this package, so it gets a generated copy). `--write` rewrites them; `--check` (and
tests/unit/test_contract_files.py) fails when one differs. Does not own: the declaration itself
(contract.py), or consumers that read the client copy at run time (the SDK's request builder, card
words and CLI flags; the gateway's OpenAI fields) and the Node client (checked by the same test).

    python -m internvl_serve.serving.contract_files --write   # after changing contract.GENERATION
    python -m internvl_serve.serving.contract_files --check
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from internvl_serve.serving import contract as c

ROOT = Path(__file__).resolve().parents[2]
WRITE_COMMAND = "python -m internvl_serve.serving.contract_files --write"
CLIENT_MODULE = "client/internvl_client/contract_inputs.py"
TABLE_FILES = {"README.md": True, "docs/contract.md": False}  # path -> with the outputs
TABLE_BEGIN, TABLE_END = "<!-- contract-table:begin -->", "<!-- contract-table:end -->"
NAMES_FILE = "docs/contract.md"  # also holds the names table
NAMES_BEGIN, NAMES_END = "<!-- generation-names:begin -->", "<!-- generation-names:end -->"
# config.pbtxt -> its generated blocks
CONFIG_BLOCKS = {
    "model_repository/internvl_chat/config.pbtxt": ("inputs", "preprocess-map", "llm-map"),
    "model_repository/internvl_chat_bls/config.pbtxt": ("inputs",),
    "model_repository/preprocess/config.pbtxt": ("inputs",),
    "model_repository/llm/config.pbtxt": ("inputs",),
}


def config_block(key: str) -> list[str]:
    """The lines of one generated config.pbtxt block (without the markers)."""
    if key == "inputs":  # every line ends with ',': the list goes on after the block
        return [f'  {{ name: "{s.name}" data_type: {s.config_type} dims: [ {", ".join(map(str, s.dims))} ] '
                f'optional: true }},' for s in c.GENERATION_INPUTS]
    if key in ("preprocess-map", "llm-map"):
        return [f'      input_map {{ key: "{s.name}" value: "{s.name}" }}' for s in c.GENERATION_INPUTS]
    raise KeyError(key)


def _replace_between(text: str, begin: str, end: str, body: str, where: str) -> str:
    pattern = re.compile(rf"(^[ \t]*{re.escape(begin)}[^\n]*\n)(.*?)(^[ \t]*{re.escape(end)})", re.S | re.M)
    matches = list(pattern.finditer(text))
    if len(matches) != 1:
        raise ValueError(f"{where}: expected one block between {begin!r} and {end!r}, found {len(matches)}")
    m = matches[0]
    return text[:m.start(2)] + body + text[m.end(2):]


def generated_config(path: str, text: str) -> str:
    for key in CONFIG_BLOCKS[path]:
        text = _replace_between(text, f"# <generated:{key}>", f"# </generated:{key}>",
                                "".join(line + "\n" for line in config_block(key)), path)
    return text


def generated_table_file(path: str, text: str) -> str:
    return _replace_between(text, TABLE_BEGIN, TABLE_END, c.contract_table_markdown(TABLE_FILES[path]) + "\n", path)


def names_table() -> str:
    """Each generation input's names in the engine, the model card (SDK, CLI), the gateway, TensorRT-LLM."""
    rows = ["| input | engine (`SamplingParams`) | model card `generation_config` / CLI flag | OpenAI gateway "
            "| TensorRT-LLM |", "|---|---|---|---|---|"]
    for g in c.GENERATION:
        card = f"`{g.card}` / `--{g.card.replace('_', '-')}`" if g.card else ""
        trt = ", ".join(f"`{n}`" for n in ((g.name,) if g.tensorrt_llm else ()) + g.aliases)
        rows.append(f"| `{g.name}` | {f'`{g.field}`' if g.field else ''} | {card} | "
                    f"{f'`{g.openai}`' if g.openai else ''} | {trt} |")
    return "\n".join(rows)


def client_module() -> str:
    """client/internvl_client/contract_inputs.py, whole."""
    lines = [
        f'"""GENERATED from internvl_serve/serving/contract.py by `{WRITE_COMMAND}`;',
        "do not edit (tests/unit/test_contract_files.py fails when this file differs from the declaration).",
        "",
        "The internvl_chat contract as the SDK sees it (the SDK does not import the server's package):",
        "INPUTS / OUTPUTS: tensor name -> Triton datatype. GENERATION: each generation input with its default,",
        "range, and its names in the model card's generation_config (`card`), the OpenAI API (`openai`) and",
        "TensorRT-LLM (`aliases`); request.py, generation.py, cli.py and the gateway read it.",
        '"""',
        "",
        "INPUTS = {",
        *(f"    {s.name!r}: {s.datatype!r}," for s in c.ENSEMBLE_INPUTS),
        "}",
        "OUTPUTS = {",
        *(f"    {s.name!r}: {s.datatype!r}," for s in c.OUTPUTS),
        "}",
        "GENERATION = (",
    ]
    for g in c.GENERATION:
        lines.append("    dict(")
        for key in ("name", "datatype", "default", "low", "high", "low_open", "openai", "card", "aliases",
                    "tensorrt_llm", "only_empty", "doc"):
            lines.append(f"        {key}={getattr(g, key)!r},")
        lines.append("    ),")
    lines.append(")")
    return "\n".join(lines) + "\n"


def expected_files() -> dict[str, str]:
    """Path (relative to the repository) -> the text it must have."""
    out = {CLIENT_MODULE: client_module()}
    for path in CONFIG_BLOCKS:
        out[path] = generated_config(path, (ROOT / path).read_text())
    for path in TABLE_FILES:
        out[path] = generated_table_file(path, (ROOT / path).read_text())
    out[NAMES_FILE] = _replace_between(out[NAMES_FILE], NAMES_BEGIN, NAMES_END, names_table() + "\n", NAMES_FILE)
    return out


def stale_files() -> list[str]:
    return [p for p, text in expected_files().items()
            if not (ROOT / p).exists() or (ROOT / p).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the generated files")
    parser.add_argument("--check", action="store_true", help="exit 1 when a generated file is out of date")
    args = parser.parse_args(argv)
    if args.write:
        for path, text in expected_files().items():
            if not (ROOT / path).exists() or (ROOT / path).read_text() != text:
                (ROOT / path).write_text(text)
                print(f"wrote {path}")
        return 0
    stale = stale_files()
    for path in stale:
        print(f"{path} differs from the contract's declaration: run {WRITE_COMMAND}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
