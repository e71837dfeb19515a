# A 64 KiB firmware image (QEMU -bios) that makes known numbers of VM exits, for the kvm
# source's exact-count test (tests/qemu/kvm_exits.rs). It replaces SeaBIOS, so no
# firmware exits mix with the counted ones and nothing waits on timers (SeaBIOS's floppy
# boot stalled on a loaded 2-core host). The CPU starts at the reset vector (offset
# 0xfff0, CS base 0xffff0000) in real mode; the image is also mapped at 0xf0000, where
# the far jump lands. The counts are symbols the test defines (as --defsym), so the test
# and the guest cannot disagree:
#   OUTS  port writes (OUT) to port 0x700
#   INS   port reads (IN) from port 0x701
#   CPUIDS  CPUIDs of leaf 0x40000010 (a hypervisor leaf: timing information)
#   RDMSRS  RDMSRs of MSR 0x10 (IA32_TIME_STAMP_COUNTER)
#   WRMSRS  RDMSR then WRMSR of the same value to MSR 0x1b (IA32_APIC_BASE): one more
#           read and one write each
#   SPREAD  CPUIDs of SPREAD different leaves, 0x40001001 up to 0x40001000 + SPREAD (a
#           guest spraying keys at the key table; 0: none)
# then one write to the isa-debug-exit port 0xf4, which ends QEMU. Ports 0x700-0x701 are
# unassigned on the pc machine.
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

    xor %esi, %esi
    mov $SPREAD, %si
    test %si, %si
    jz 8f
7:  mov $0x40001000, %eax
    add %esi, %eax
    cpuid
    dec %si
    jnz 7b
8:
    mov $0, %al
    out %al, $0xf4
6:  hlt
    jmp 6b

.org 0xfff0
reset:
    ljmp $0xf000, $_start

.org 0x10000
