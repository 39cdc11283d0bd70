"""How ``sentences.txt`` was made (a one-off, kept for provenance; `nas` never runs it).

Harvests prose sentences from the docstrings and comments of the CPython 3.11.7 standard library
(PSF License), keeps those of 4-20 words made only of words in the SCOWL list
(``/usr/share/dict/american-english`` from Debian's ``wamerican``) or a short technical list, and
writes them one per line. Run: ``python -m nas.data.make_sentences > nas/data/sentences.txt``.
"""
import ast, io, re, sys, tokenize
from pathlib import Path
LIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
SKIP = {"site-packages", "__pycache__", "encodings", "pydoc_data", "ensurepip"}
texts = []
for p in sorted(LIB.rglob("*.py")):
    rel = p.relative_to(LIB)
    if SKIP & set(rel.parts): continue
    src = p.read_text(encoding="utf-8", errors="replace")
    try: tree = ast.parse(src)
    except SyntaxError: continue
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d:
                for para in re.split(r"\n\s*\n", d): texts.append(para)
    # comments: join consecutive comment lines into paragraphs
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except Exception: continue
    buf, last = [], -5
    for t in toks:
        if t.type == tokenize.COMMENT:
            line = t.string.lstrip("#").strip()
            if t.start[0] == last + 1 and line: buf.append(line)
            else:
                if buf: texts.append(" ".join(buf))
                buf = [line] if line else []
            last = t.start[0]
    if buf: texts.append(" ".join(buf))
print(len(texts), "paragraphs", file=sys.stderr)
WORD = re.compile(r"^(?:[A-Za-z]+(?:'[a-z]+)?|I)$")
cands = []
for para in texts:
    para = re.sub(r"\s+", " ", para).strip()
    if re.search(r"[>|]{2}|\$|::", para): continue
    for s in re.split(r"(?<=[.!?;])\s+(?=[A-Z])", para):
        if not re.fullmatch(r"[A-Z][A-Za-z' ,]*[a-z][.!?;]", s): continue
        s = s[:-1]
        words = s.replace(",", " ").split()
        if not 4 <= len(words) <= 20: continue
        ok = True
        for i, w in enumerate(words):
            if not WORD.match(w) or (i > 0 and w != "I" and any(c.isupper() for c in w)) or (i == 0 and any(c.isupper() for c in w[1:])):
                ok = False; break
            if not re.search(r"[aeiouy]", w.lower()) or len(w) > 16: ok = False; break
        if ok: cands.append(" ".join(w.lower() for w in words))
print(len(cands), "candidates", len(set(cands)), "distinct", file=sys.stderr)
cands = list(dict.fromkeys(cands))
# words must be English: in the SCOWL word list (Debian's wamerican) or a few common technical words
D = {l.strip() for l in open("/usr/share/dict/american-english") if l.strip() == l.strip().lower()}
D |= set("""tuple tuples callback callbacks filename filenames coroutine coroutines namespace namespaces
traceback tracebacks timeout timeouts whitespace breakpoint breakpoints docstring docstrings subclasses iterable
iterables formatter formatters unicode subprocess subprocesses bytecode pathname pathnames runtime globals metadata
filesystem filesystems colorizing boolean booleans behaviour datagram datagrams instantiating unregister hashable
parsers subparts multipart multiline callables subdirectories subdirectory finalization encodings subelements codec
codecs symlink symlinks""".split())
ok = lambda w: w in D and (len(w) > 1 or w in ("a", "i"))
keep = [s for s in cands if all(ok(w) for w in s.split())]
vocab = {w for s in keep for w in s.split()}
print(len(keep), "kept", len(vocab), "vocab", sum(map(len, keep)), "chars", file=sys.stderr)
for s in keep: print(s)
