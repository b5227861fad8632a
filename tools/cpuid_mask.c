/* LD_PRELOAD library that makes this process see an older x86 CPU: cpuid faults (Linux ARCH_SET_CPUID, on CPUs
 * with CPUID faulting) and a SIGSEGV handler answers it with the real values less the features of the level named
 * in DENOQ_CPUID_LEVEL:
 *   avx2      no AVX-512, no AVX-VNNI (e.g. Haswell .. Comet Lake, Zen 1-3)
 *   avx512bw  AVX-512 without VNNI (Skylake-SP)
 * Built and used by tools/cpu_as.py; libraries that pick kernels by cpuid (ONNX Runtime's MLAS, numpy, torch)
 * then run the kernels of that level at native speed. The handler is installed before main(): a program that
 * later installs its own SIGSEGV handler (Python's faulthandler) must not, or cpuid crashes it. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static unsigned leaf7_ebx_clear, leaf7_ecx_clear, leaf7_edx_clear, leaf71_eax_clear;

static void set_cpuid(int enabled) { syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void on_segv(int sig, siginfo_t *info, void *context) {
    greg_t *r = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: die as we would have */
        signal(sig, SIG_DFL);
        return;
    }
    unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
    set_cpuid(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        b &= ~leaf7_ebx_clear;
        c &= ~leaf7_ecx_clear;
        d &= ~leaf7_edx_clear;
    } else if (leaf == 7 && sub == 1) {
        a &= ~leaf71_eax_clear;
    }
    r[REG_RAX] = a;
    r[REG_RBX] = b;
    r[REG_RCX] = c;
    r[REG_RDX] = d;
    r[REG_RIP] += 2;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    const char *level = getenv("DENOQ_CPUID_LEVEL");
    const unsigned vnni_ecx = 1u << 11, avx_vnni_eax = 1u << 4;
    if (level == NULL || strcmp(level, "avx2") == 0) {
        /* every AVX-512 subset in leaf 7 (F, DQ, IFMA, PF, ER, CD, BW, VL; VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ;
         * 4VNNIW, 4FMAPS, VP2INTERSECT, FP16) and AVX-VNNI / AVX512-BF16 in leaf 7.1 */
        leaf7_ebx_clear = (1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                          (1u << 30) | (1u << 31);
        leaf7_ecx_clear = (1u << 1) | (1u << 6) | vnni_ecx | (1u << 12) | (1u << 14);
        leaf7_edx_clear = (1u << 2) | (1u << 3) | (1u << 8) | (1u << 23);
        leaf71_eax_clear = avx_vnni_eax | (1u << 5);
    } else if (strcmp(level, "avx512bw") == 0) {
        leaf7_ecx_clear = vnni_ecx;
        leaf71_eax_clear = avx_vnni_eax | (1u << 5);
    } else {
        static const char msg[] = "cpuid_mask: DENOQ_CPUID_LEVEL must be avx2 or avx512bw\n";
        write(2, msg, sizeof msg - 1);
        _exit(2);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        static const char msg[] = "cpuid_mask: this CPU or kernel has no CPUID faulting; cannot imitate a CPU\n";
        write(2, msg, sizeof msg - 1);
        _exit(2);
    }
}
