"""The user's documents (``../shared/seeds``) read as the tests run them: the SGLang notebook's code
cells, the Alpaca demo's curl requests, the LLM Engine reference's code and signatures.

The documents are web captures: the notebook's JSON lines are separated by ``|`` lines, and the
capture kept only whether a code line was indented, not how deep (every indented line starts
with one space). ``reindent`` restores the depth by rules (below), so the cells run as their
authors wrote them; nothing in them is retyped. ``tests/seeds/documents/`` holds a copy of the
documents for a checkout without ``../shared`` (CI); a test checks the copy equals the original
wherever both exist.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "seeds"  # ../shared/seeds beside the repository
COPY = HERE / "documents"


def seed_path(number: str, directory: Path | None = None) -> Path:
    """The document ``NNN_*.txt`` from ``../shared/seeds``, else from the copy in the repo."""
    for root in ([directory] if directory else [SHARED, COPY]):
        found = sorted(root.glob(f"{number}_*.txt")) if root.is_dir() else []
        if found:
            return found[0]
    raise FileNotFoundError(f"seed document {number} is in neither {SHARED} nor {COPY}")


def seed_text(number: str) -> str:
    return seed_path(number).read_text(encoding="utf-8")


# --- 000: the SGLang notebook -------------------------------------------------------------

def notebook_cells(text: str) -> list[str]:
    """The code cells of the captured notebook, in order, indentation restored."""
    lines = text.split("\n")
    start = lines.index("{")  # the capture's header ("603 lines", "20 KiB", ...) comes first
    notebook = json.loads("\n".join(line for line in lines[start:] if line != "|"))
    return [reindent("".join(cell["source"]))
            for cell in notebook["cells"] if cell["cell_type"] == "code"]


_OPENER = re.compile(r"^(if|elif|else|for|while|try|except|finally|with|def|class)\b.*:\s*(#.*)?$")
_CLOSER = {"else": ("if", "elif", "for", "while", "try", "except"), "elif": ("if", "elif"),
           "except": ("try", "except"), "finally": ("try", "except", "else")}


@dataclass
class _Block:
    keyword: str  # the opener's first word
    depth: int  # the opener's own depth; its body is one deeper
    statements: int = 0  # statements seen in its body


def reindent(source: str, unit: str = "    ") -> str:
    """Restore the depth of a captured cell whose indented lines all start with one space.

    Rules, in order, for a line that starts a statement (lines inside brackets follow the
    statement they continue, one unit deeper):

    1. a line without the leading space is at depth 0;
    2. ``else``/``elif``/``except``/``finally`` are at the depth of the block they continue;
    3. the first line after a block opener (a line ending with ``:``) is one deeper;
    4. after a blank line the innermost block is closed (the code's own paragraphs end
       blocks), but never below depth 1 for an indented line;
    5. an ``if`` right after the one-statement body of an ``if`` block is that block's
       sibling (``if a:\\n    x()\\nif b:``), the common form;
    6. otherwise a line stays at the depth of the statement before it.
    """
    out: list[str] = []
    blocks: list[_Block] = []
    depth, brackets, blank, opened = 0, 0, False, False
    for raw in source.split("\n"):
        text = raw.strip()
        if not text:
            out.append("")
            blank = True
            continue
        if brackets > 0:  # a continuation line
            out.append(unit * (depth + 1) + text)
        elif text.startswith("#"):  # placed at the next statement's depth, guessed as now
            out.append(unit * (_after_blank(depth, raw) if blank else depth) + text)
            continue
        else:
            keyword = text.split()[0].rstrip(":")
            depth = _depth(raw, keyword, depth, blocks, blank, opened)
            while blocks and blocks[-1].depth >= depth:
                blocks.pop()
            if blocks:
                blocks[-1].statements += 1
            out.append(unit * depth + text)
            opened = bool(_OPENER.match(text))
            if opened:
                blocks.append(_Block(keyword, depth))
        brackets += _bracket_delta(text)
        blank = False
    return "\n".join(out)


def _depth(raw: str, keyword: str, depth: int, blocks: list[_Block], blank: bool,
           opened: bool) -> int:
    if not raw.startswith(" "):
        return 0
    if keyword in _CLOSER:
        for block in reversed(blocks):
            if block.keyword in _CLOSER[keyword]:
                return block.depth
    if opened:
        return depth + 1
    if blank:
        return _after_blank(depth, raw)
    inner = blocks[-1] if blocks else None
    if (keyword == "if" and inner is not None and inner.keyword == "if"
            and inner.statements == 1 and depth == inner.depth + 1):
        return inner.depth
    return depth


def _after_blank(depth: int, raw: str) -> int:
    """Rule 4: a blank line closes the innermost block; an indented line stays indented."""
    return max(1 if raw.startswith(" ") else 0, depth - 1)


def _bracket_delta(text: str) -> int:
    """Opening minus closing brackets outside string literals and comments."""
    delta, quote, i = 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        elif c in "([{":
            delta += 1
        elif c in ")]}":
            delta -= 1
        i += 1
    return delta


# --- 003: the Chinese-LLaMA-Alpaca API demo ----------------------------------------------

@dataclass
class CurlRequest:
    """One ``curl URL -H ... -d 'BODY'`` command of the demo."""

    command: str  # the shell command, continuation lines joined
    url: str
    headers: dict[str, str]
    body: str  # exactly as the document writes it


def curl_requests(text: str) -> list[CurlRequest]:
    """Every curl command of the document, in order (backslash-continued lines joined)."""
    commands = re.findall(r"^curl .*?'\s*$", text.replace("\\\n", " "), flags=re.M | re.S)
    requests = []
    for command in commands:
        words = shlex.split(command)
        headers, body = {}, ""
        for flag, value in zip(words, words[1:]):
            if flag == "-H":
                name, _, content = value.partition(":")
                headers[name.strip()] = content.strip()
            elif flag == "-d":
                body = value
        requests.append(CurlRequest(command, words[1], headers, body))
    return requests


# --- 004: the LLM Engine client reference -------------------------------------------------

def python_block(text: str, first_line: str, last_line: str) -> str:
    """The lines from the one starting with ``first_line`` to the next starting with
    ``last_line``, both included."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(first_line))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(last_line))
    return "\n".join(lines[start:end + 1])


def signatures(text: str, name: str) -> list[dict[str, str | None]]:
    """Each documented ``name(...) -> ...`` signature, as {parameter: default source text, or
    None when it has no default}, read with ``ast`` so multi-line annotations parse."""
    found = []
    for match in re.finditer(rf"^{name}\((.*?)^\) ->", text, flags=re.M | re.S):
        args = ast.parse(f"def {name}({match.group(1)}): pass").body[0].args  # type: ignore
        defaults = [None] * (len(args.args) - len(args.defaults)) + [
            ast.unparse(d) for d in args.defaults]
        found.append({a.arg: d for a, d in zip(args.args, defaults)})
    return found


def json_examples(text: str) -> list[object]:
    """The JSON objects the document shows, in order: the streamed lines of LLM Engine's
    reference (``{"request_id": ...}``), and blocks from a line ``{`` to the line that
    balances it. An elided list item (a ``....,`` line, as the embedding example writes it)
    is dropped."""
    examples: list[object] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith('{"request_id"'):
            examples.append(json.loads(line))
        elif line == "{":
            depth, j = 0, i
            while j < len(lines):
                depth += _bracket_delta(lines[j])
                if depth == 0:
                    break
                j += 1
            kept = [x for x in lines[i:j + 1] if not re.fullmatch(r"\s*\.+,?", x)]
            examples.append(json.loads("\n".join(kept)))
            i = j
        i += 1
    return examples


# --- 002: Anyscale's preference-tuning notebook ----------------------------------------------

def printed_file(text: str, command: str) -> str:
    """What the notebook's cell ``command`` (e.g. ``!cat configs/x.yaml``) printed: the text of
    its stream output."""
    notebook = json.loads(text)
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code" and "".join(cell["source"]).strip() == command:
            texts = [out["text"] for out in cell.get("outputs", []) if "text" in out]
            return "".join(t if isinstance(t, str) else "".join(t) for t in texts)
    raise LookupError(f"no cell runs {command!r}")
