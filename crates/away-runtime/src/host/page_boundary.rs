//! A sleep whose stack pointer sits exactly on a page boundary while the thread waits in
//! the kernel, which is where CRIU reads it when it freezes the process. Used by the
//! doctor's CRIU stack-page probe and, included by path, by images/memload (which stays a
//! dependency-free std-only binary): std only here.

use std::time::Duration;

#[cfg(target_arch = "x86_64")]
pub fn sleep(d: Duration) {
    let ts: [i64; 2] = [d.as_secs() as i64, i64::from(d.subsec_nanos())];
    // SAFETY: nanosleep(2) only reads `ts`. The stack pointer moves down to the page
    // boundary below it (stack space below the pointer is ours: no `nostack`), the
    // syscall uses no user stack, and r12 brings the pointer back. An interrupted
    // sleep just ends early.
    #[allow(unsafe_code)]
    unsafe {
        std::arch::asm!(
            "mov r12, rsp",
            "and rsp, -4096",
            "syscall",
            "mov rsp, r12",
            inlateout("rax") 35i64 => _,
            in("rdi") ts.as_ptr(),
            in("rsi") 0usize,
            out("rcx") _,
            out("r11") _,
            out("r12") _,
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn sleep(d: Duration) {
    std::thread::sleep(d)
}
