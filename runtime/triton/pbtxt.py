"""Strings for Triton's ``config.pbtxt`` (protobuf text format), shared by the repository
writer and the Python-backend writer."""


def pbtxt_string(value: str) -> str:
    """``value`` as a protobuf text-format string literal: '"' and '\\' escaped, every byte
    outside printable ASCII (newlines, UTF-8 of non-ASCII letters) as an octal escape, so no
    value can end its field and start another."""
    out = []
    for byte in str(value).encode("utf-8"):
        if byte in b'"\\':
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'
