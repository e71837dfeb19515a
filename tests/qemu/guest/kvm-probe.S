# A boot sector that makes known numbers of VM exits, for the kvm source's exact-count
# test (tests/qemu/kvm_exits.rs). Real mode, 16-bit; the counts are symbols the test
# defines (as --defsym), so the test and the guest cannot disagree:
#   OUTS  port writes (OUT) to port 0x700
#   INS   port reads (IN) from port 0x701
#   CPUIDS  CPUIDs of leaf 0x40000010 (a hypervisor leaf, timing: SeaBIOS probes
#           0x40000000 and every 0x100 above it, never this one)
#   RDMSRS  RDMSRs of MSR 0x10 (IA32_TIME_STAMP_COUNTER)
#   WRMSRS  RDMSR then WRMSR of the same value to MSR 0x1b (IA32_APIC_BASE): one more
#           read and one write each
# then one write to the isa-debug-exit port 0xf4, which ends QEMU. Ports 0x700-0x701 are
# unassigned on q35 and the firmware never touches them (SeaBIOS logs to 0x402).
# The loop counter is SI: CPUID clobbers EAX-EDX and RDMSR EAX/EDX.
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp

    mov $0x700, %dx
    mov $OUTS, %si
1:  out %al, %dx
    dec %si
    jnz 1b

    mov $0x701, %dx
    mov $INS, %si
2:  in %dx, %al
    dec %si
    jnz 2b

    mov $CPUIDS, %si
3:  mov $0x40000010, %eax
    cpuid
    dec %si
    jnz 3b

    mov $RDMSRS, %si
4:  mov $0x10, %ecx
    rdmsr
    dec %si
    jnz 4b

    mov $WRMSRS, %si
5:  mov $0x1b, %ecx
    rdmsr
    wrmsr
    dec %si
    jnz 5b

    mov $0, %al
    out %al, $0xf4
6:  hlt
    jmp 6b

.org 510
.word 0xaa55
