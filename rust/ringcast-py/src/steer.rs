//! `steer_accepts`: which of the listening sockets sharing a port (`SO_REUSEPORT`) the
//! kernel gives new connections to, by a classic BPF program attached to their group
//! (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.5+, no privilege needed). The program's result is an
//! index into the group's sockets (in the order they started listening; a socket that
//! closes is replaced by the last); an index past the end makes the kernel fall back to its
//! own hash over all of them.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; the architectures that number socket
/// options otherwise, mips, sparc and parisc, are not ones ringcast builds for).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

// Classic BPF opcodes (linux/bpf_common.h, linux/filter.h): class | size | source.
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20): load a 32-bit word.
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_ALU | BPF_MOD | BPF_K` (0x04 | 0x90 | 0x00): A %= k.
const BPF_ALU_MOD_K: u16 = 0x94;
/// `BPF_RET | BPF_K` (0x06 | 0x00): return k.
const BPF_RET_K: u16 = 0x06;
/// `BPF_RET | BPF_A` (0x06 | 0x10): return A.
const BPF_RET_A: u16 = 0x16;
/// `SKF_AD_OFF + SKF_AD_RANDOM`: a load from here reads a fresh random u32.
const SKF_AD_RANDOM: u32 = 0xffff_f000 + 56;

fn insn(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The program for `among`: 0 (every socket: an index no group has, so the kernel's hash
/// decides), 1 (the first socket), or n (one of the first n, at random per connection).
fn program(among: u32) -> Vec<libc::sock_filter> {
    match among {
        0 => vec![insn(BPF_RET_K, u32::MAX)],
        1 => vec![insn(BPF_RET_K, 0)],
        n => vec![
            insn(BPF_LD_W_ABS, SKF_AD_RANDOM),
            insn(BPF_ALU_MOD_K, n),
            insn(BPF_RET_A, 0),
        ],
    }
}

/// steer_accepts(fd, among)
/// --
///
/// Steers the new connections of the port that the listening socket ``fd`` shares with
/// ``SO_REUSEPORT``: ``among`` = 0 spreads them over every listening socket of the port (the
/// kernel's hash of each connection's addresses), 1 gives them all to the first socket that
/// listened, n to one of the first n at random. It applies to the whole group, whichever of
/// its sockets sets it; a later call replaces it. Connections already accepted or queued
/// are not moved. Raises OSError if the kernel refuses (not a socket, no ``SO_REUSEPORT``,
/// a kernel before 4.5). A bound socket that does not listen yet gets a group of its own,
/// which the port's listeners do not share.
#[pyfunction]
pub(crate) fn steer_accepts(fd: i32, among: u32) -> PyResult<()> {
    if fd < 0 {
        return Err(PyValueError::new_err(format!(
            "fd must be a descriptor, not {fd}"
        )));
    }
    let mut filter = program(among);
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).expect("a program of at most 3 instructions"),
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, a live Vec of `prog.len` instructions, for the
    // duration of the call, and `optlen` is the size of `prog`; the kernel copies the program
    // before returning and keeps no pointer to either. `fd` is only a number to the kernel: a
    // descriptor that is closed or not a socket makes the call fail with an errno.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // Through io::Error, so the OSError carries its errno.
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::program;

    #[test]
    fn the_programs_return_an_index_the_kernel_reads_as_meant() {
        assert_eq!(program(0).len(), 1);
        assert_eq!(program(0)[0].k, u32::MAX);
        assert_eq!(program(1)[0].k, 0);
        let p = program(3);
        assert_eq!(p.len(), 3);
        assert_eq!(p[1].k, 3);
    }
}
