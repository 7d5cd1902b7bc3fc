"""The standard library's package families that `text_domains` streams as domains, without
torch: the command line checks `data.domains` against them before any import.
"""

from __future__ import annotations

from collections.abc import Sequence

# Families of standard-library modules/packages (top-level names), one domain each.
# fmt: off
DOMAINS: dict[str, tuple[str, ...]] = {
    # text processing, markup and config formats, command-line parsing
    "text": (
        "string", "re", "textwrap", "difflib", "html", "xml", "json", "csv", "configparser",
        "tomllib", "gettext", "locale", "_strptime", "calendar", "shlex", "fnmatch", "pprint",
        "reprlib", "_markupbase", "plistlib", "cmd", "getopt", "optparse", "argparse",
    ),
    # internet protocols, mail and web
    "net": (
        "http", "urllib", "email", "mailbox", "xmlrpc", "wsgiref", "smtplib", "imaplib", "poplib",
        "ftplib", "nntplib", "telnetlib", "socket", "socketserver", "ssl", "ipaddress", "cgi",
        "cgitb", "webbrowser", "mimetypes", "smtpd", "asyncore", "asynchat", "uuid", "netrc",
        "mailcap",
    ),
    # threads, processes, event loops
    "concurrency": (
        "asyncio", "concurrent", "multiprocessing", "threading", "queue", "sched", "subprocess",
        "_threading_local", "selectors", "signal", "contextvars", "pty",
    ),
    # character codecs, binary encodings, compression, archives, persistence
    "codecs": (
        "encodings", "codecs", "base64", "quopri", "uu", "stringprep", "bz2", "lzma", "gzip",
        "zipfile", "tarfile", "_compression", "zipimport", "zipapp", "pickle", "pickletools",
        "_compat_pickle", "copyreg", "shelve", "dbm", "xdrlib", "hashlib", "hmac", "secrets",
        "crypt", "chunk", "aifc", "wave", "sunau", "sndhdr", "imghdr", "colorsys",
    ),
    # the language's own tools: parsing, compiling, importing, testing, docs
    "tooling": (
        "ast", "dis", "inspect", "tokenize", "token", "keyword", "symtable", "opcode",
        "py_compile", "compileall", "codeop", "code", "importlib", "pkgutil", "modulefinder",
        "runpy", "unittest", "doctest", "pdb", "bdb", "trace", "traceback", "pydoc", "pyclbr",
        "tabnanny", "timeit", "profile", "cProfile", "pstats", "tracemalloc", "lib2to3",
    ),
}
# fmt: on
DEFAULT_DOMAINS = ("text", "net", "concurrency", "codecs")


def check_domains(domains: Sequence[str]) -> None:
    """ValueError naming `data.domains` unless it lists distinct names of `DOMAINS`."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains or len(set(domains)) != len(domains):
        raise ValueError(
            f"data.domains={list(domains)} must be distinct names from: {', '.join(DOMAINS)}"
        )
