"""ELF facts of a kernel module, for assertions: machine, sections, vermagic."""

from __future__ import annotations

import struct


def elf_machine(data: bytes) -> int:
    """The ELF e_machine of DATA (62 x86-64, 183 AArch64)."""
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    endian = "<" if data[5] == 1 else ">"
    return int(struct.unpack_from(endian + "H", data, 18)[0])


def elf_section(data: bytes, name: str) -> bytes:
    """The contents of section NAME of the ELF file DATA."""
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    is64 = data[4] == 2
    e = "<" if data[5] == 1 else ">"
    if is64:
        shoff = struct.unpack_from(e + "Q", data, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x3A)
    else:
        shoff = struct.unpack_from(e + "I", data, 0x20)[0]
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x2E)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        if is64:
            sh_name = struct.unpack_from(e + "I", data, base)[0]
            offset, size = struct.unpack_from(e + "QQ", data, base + 24)
        else:
            sh_name = struct.unpack_from(e + "I", data, base)[0]
            offset, size = struct.unpack_from(e + "II", data, base + 16)
        return sh_name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = data[str_off:str_off + str_size]
    for i in range(shnum):
        sh_name, offset, size = header(i)
        end = names.find(b"\0", sh_name)
        if names[sh_name:end].decode("ascii", "replace") == name:
            return data[offset:offset + size]
    raise ValueError(f"no section {name}")


def vermagic(data: bytes) -> str:
    """The `vermagic=` string of a kernel module's .modinfo section."""
    for entry in elf_section(data, ".modinfo").split(b"\0"):
        if entry.startswith(b"vermagic="):
            return entry[len(b"vermagic="):].decode("utf-8", "replace")
    raise ValueError("no vermagic in .modinfo")
