/*
 * vmferry test guest: a tiny multiboot (v1) kernel for live-migration tests.
 *
 * Built by vmferry.guest.build_guest() with `as --32` and
 * `ld -m elf_i386 -T guest.ld`: QEMU's `-kernel` only accepts multiboot
 * images as ELF32.  The multiboot entry point is 32-bit code that identity
 * maps the low 4 GiB with 2 MiB pages and switches to 64-bit long mode; all
 * the work happens in long mode.  Why not stay in flat 32-bit protected mode:
 * some KVM implementations (e.g. kvm-pvm, used by nested sandboxes) cannot run
 * unpaged or non-PAE code natively and fall back to the in-kernel instruction
 * emulator, which is very slow and cannot even emulate a protected-mode IRET.
 * Long mode with paging runs natively on VMX/SVM KVM and under TCG.  For the
 * same reason the memory loop runs in ring 3: a PVM host runs guest *user*
 * mode natively but emulates a non-paravirtualized guest kernel instruction by
 * instruction.  Ring 0 only does setup, the timer interrupt and a few
 * "system calls" (serial output, sleep, halt), which are rare.
 * Because the object file is elf32-i386, 64-bit code must address symbols
 * RIP-relative (`sym(%rip)`) or through 32-bit immediates (`mov $sym, %r32`).
 *
 * What it does
 *   The guest owns the memory region [2 MiB, end) where `end` is the end of the
 *   usable e820 range that contains 2 MiB (multiboot mmap; fallback: mem_upper
 *   minus 1 MiB), optionally capped by `mem=` on the command line.
 *   Pass N (N = 1, 2, 3, ...) walks every 4 KiB page of the region in address
 *   order; for each page it first VERIFIES that every 32-bit word holds
 *
 *       pattern(N-1, addr) = addr ^ ((N-1) * 0x9E3779B1)     (addr = word's address)
 *
 *   and then REWRITES the page with pattern(N, addr).  Pass 1 only writes.
 *   Because the key changes with every pass and the address is folded into every
 *   word, a page that migration lost (stale content from any older pass), a torn
 *   page (part old, part new), a page copied to the wrong place or a shifted
 *   copy are all detected.  Since 0x9E3779B1 is odd, the host can recover the
 *   pass a bad word came from: (got ^ addr) * inverse(0x9E3779B1) mod 2^32.
 *
 * Serial protocol (COM1, 115200 8N1, one line per event, "\n" terminated)
 *   vmferry-guest cmdline <multiboot command line>
 *   vmferry-guest start pages=<P> base=<hex8> end=<hex8> mode=<fast|slow|idle> pps=<N> hb=<ms> verify=<N> selftest=<0|1> onerror=<go|halt> tlbflush=<0|1>
 *   vmferry-guest pass <N> ok pages=<P> ms=<T>
 *   vmferry-guest pass <N> bad pages=<P> ms=<T> errors=<bad pages>
 *   vmferry-guest ERROR pass <N> page <i> word <w> expected <hex8> got <hex8> addr=<hex8>
 *   vmferry-guest tick <K> ms=<T>                                 (idle heartbeat)
 *   vmferry-guest verify <N> ok|bad pages=<P> ms=<T> [errors=<E>]  (idle re-check)
 *   vmferry-guest ERROR verify <N> page ...                       (idle mismatch)
 *   vmferry-guest selftest corrupted page <i> word 5 addr=<hex8>
 *   vmferry-guest FATAL <reason>
 *   vmferry-guest halted
 *   `page` is the index inside the region (addr = 0x200000 + 4096*page + 4*word);
 *   `ms` values come from a 1000 Hz PIT tick (guest virtual time).  At most 8
 *   ERROR lines are printed per pass (the pass line counts all bad pages).
 *   After a mismatch the guest keeps going (the page is rewritten, so the next
 *   pass is clean again) unless `onerror=halt` is given.
 *
 * Command line (multiboot cmdline, i.e. QEMU -append; unknown words are ignored)
 *   mem=SIZE        cap the region at SIZE (suffix K, M or G; a bare number is MiB)
 *   dirty=fast      rewrite memory as fast as possible (default)
 *   dirty=slow      rate-limit the rewriting (default 16 MiB/s, see rate=)
 *   dirty=idle      write the pattern once, then only print a heartbeat every
 *                   hb= ms and hlt in between; optionally re-verify (read only)
 *   rate=SIZE       rewrite SIZE per second (K/M/G suffix, bare = MiB); implies
 *                   dirty=slow; rate=0 means unlimited (dirty=fast)
 *   hb=MS           idle heartbeat interval in ms (default 1000)
 *   verify=N        idle: verify the whole region every N heartbeats (default 0 = never)
 *   selftest=corrupt  flip one bit in the middle page after pass 2 (idle: after
 *                   pass 1) so the verification path is exercised for real
 *   onerror=halt    print "halted" and stop after a pass/verify that saw errors
 *   tlbflush=1      reload CR3 (flush the TLB) on every timer tick.  Work-around
 *                   for a QEMU TCG bug fixed in QEMU 9.0 (commit 03bfc2188f,
 *                   "physmem: Fix migration dirty bitmap coherency with TCG
 *                   memory access"): before it, a store through a TLB entry
 *                   cached before a dirty-bitmap sync is not logged, so a page
 *                   the guest keeps writing (our variables, the stack) can
 *                   silently miss the final copy.  On QEMU 7.2 + TCG this guest
 *                   caught that in 8 of 12 fast/slow-mode migrations.  Flushing
 *                   every 1 ms makes the next store re-log the page: 0 of 12
 *                   failed; it narrows the window but cannot close it.  Not
 *                   needed with KVM.
 */

    .set MB_MAGIC,      0x1BADB002
    .set MB_FLAGS,      0x00000003      /* page-align modules, give us memory info */
    .set MB_CHECKSUM,   -(MB_MAGIC + MB_FLAGS)
    .set MB_BOOT_MAGIC, 0x2BADB002

    .set COM1,          0x3f8
    .set REGION_START,  0x200000        /* above the kernel (1 MiB) and the multiboot info */
    .set PAGE_SIZE,     4096
    .set WORDS_PER_PAGE, 1024
    .set CHUNK,         256             /* bytes handled per unrolled loop iteration */
    .set HZ,            1000
    .set PIT_DIVISOR,   1193            /* 1193182 Hz / 1000 */
    .set KEY,           0x9E3779B1      /* odd => N*KEY is a bijection, every pass differs */
    .set MAX_ERR_LINES, 8               /* per pass: don't flood the serial port */
    .set SLOW_PPS,      4096            /* dirty=slow default: 4096 pages/s = 16 MiB/s */

    .set MODE_FAST, 0
    .set MODE_SLOW, 1
    .set MODE_IDLE, 2

    .set RUN_VERIFY, 1
    .set RUN_WRITE,  2

    .set SEL_CODE32, 0x08
    .set SEL_DATA,   0x10
    .set SEL_CODE64, 0x18

    .set SEL_UDATA,  0x20
    .set SEL_UCODE64, 0x28
    .set SEL_TSS,    0x30

/* System calls: r10 = function, r11 = argument; r10 and r11 are clobbered,
 * every other register is preserved.  Ring 3 enters the kernel with UD2: the
 * #UD handler recognises it, runs the call and resumes after the UD2.  Why
 * not INT n: a PVM host turned INT $0x80 from guest user mode into #UD, while
 * exceptions are delivered faithfully by every hypervisor and by TCG.  Ring 0
 * code calls the dispatcher directly (IN_USER = 0): KVM's instruction
 * emulator, which runs our ring 0 code on PVM, cannot emulate INT n in
 * protected mode, and a plain call is cheaper anyway. */
    .set SYS_PUTC,  0               /* r11b = character */
    .set SYS_PUTS,  1               /* r11 = NUL-terminated string */
    .set SYS_PUTDEC, 2              /* r11d = value, decimal */
    .set SYS_PUTHEX, 3              /* r11d = value, 8 hex digits */
    .set SYS_SLEEP_UNTIL, 4         /* hlt until ticks - r11d >= 0 */
    .set SYS_HALT,  5               /* print "halted" and stop for good */

    .set IN_USER, 0

.macro SYSCALL nr:req, arg:req
    mov \arg, %r11d
    mov $\nr, %r10d
    .if IN_USER
    ud2
    .else
    call syscall_dispatch
    .endif
.endm

.macro PRINTS text:req
    .pushsection .rodata
.Lstr\@: .asciz "\text"
    .popsection
    SYSCALL SYS_PUTS, $.Lstr\@
.endm

.macro PRINTD val:req               /* 32-bit value, decimal */
    SYSCALL SYS_PUTDEC, \val
.endm

.macro PRINTX val:req               /* 32-bit value, 8 hex digits */
    SYSCALL SYS_PUTHEX, \val
.endm

.macro NEWLINE
    SYSCALL SYS_PUTC, $'\n'
.endm

/* The multiboot header must be within the first 8 KiB of the file: guest.ld
 * places this section first. */
    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC, MB_FLAGS, MB_CHECKSUM

/* ------------------------------------------------------------------------ */
/* 32-bit multiboot entry: eax = boot magic, ebx = multiboot info */
    .text
    .code32
    .globl _start
_start:
    cli
    cld
    /* Zero .bss first (the loader is not required to), keeping eax/ebx. */
    mov %eax, %edx
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    mov %edx, mb_magic
    mov %ebx, mb_info

    /* The multiboot spec leaves GDTR undefined: load our own. */
    lgdt gdt_desc
    ljmp $SEL_CODE32, $1f
1:  mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $stack_top, %esp

    /* Identity map 0..4 GiB with 2 MiB pages: PML4[0] -> PDPT[0..3] -> 4 PDs. */
    /* Everything is user-accessible: the ring 3 worker touches it all. */
    mov $pdpt, %eax
    or $7, %eax                 /* present | writable | user */
    mov %eax, pml4
    mov $pd, %eax
    or $7, %eax
    mov $pdpt, %edi
    mov $4, %ecx
2:  mov %eax, (%edi)
    add $PAGE_SIZE, %eax
    add $8, %edi
    loop 2b
    mov $pd, %edi
    mov $0x87, %eax             /* present | writable | user | 2 MiB page */
    mov $2048, %ecx
3:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 3b

    /* Enter long mode: PAE, CR3, EFER.LME, then paging. */
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp $SEL_CODE64, $long_entry

/* ------------------------------------------------------------------------ */
    .code64
long_entry:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    mov $stack_top, %esp        /* zero-extends into rsp */

    call serial_init
    call idt_init
    call tss_init
    call pic_pit_init
    call read_multiboot
    call parse_cmdline
    call setup_config
    call print_start

    /* Drop to ring 3 with interrupts enabled (IOPL 0). */
    pushq $(SEL_UDATA | 3)
    mov $user_stack_top, %eax   /* (pushq $sym would need a 64-bit relocation) */
    push %rax
    pushq $0x202
    pushq $(SEL_UCODE64 | 3)
    mov $user_main, %eax
    push %rax
    iretq

/* ------------------------------------------------------------------------ */
/* Ring 3 from here on, up to the "Boot-time setup" section. */
    .set IN_USER, 1
user_main:
    cmpl $MODE_IDLE, mode(%rip)
    je idle_main

    /* fast / slow: verify + rewrite forever */
    movl $1, pass_no(%rip)
1:  call do_pass
    incl pass_no(%rip)
    jmp 1b

/* idle mode: fill once, then heartbeat (and optionally verify) with hlt in between */
idle_main:
    movl $1, pass_no(%rip)
    call do_pass
    mov ticks(%rip), %eax
    add hb_ms(%rip), %eax
    mov %eax, next_hb(%rip)
2:  SYSCALL SYS_SLEEP_UNTIL, next_hb(%rip)
    incl hb_count(%rip)
    PRINTS "vmferry-guest tick "
    PRINTD hb_count(%rip)
    PRINTS " ms="
    PRINTD ticks(%rip)
    NEWLINE
    mov hb_ms(%rip), %eax
    add %eax, next_hb(%rip)
    /* Resync instead of bursting if we fell behind (long verify, tick
     * catch-up after a migration). */
    mov ticks(%rip), %eax
    sub next_hb(%rip), %eax
    js 4f
    mov ticks(%rip), %eax
    add hb_ms(%rip), %eax
    mov %eax, next_hb(%rip)
4:  mov verify_every(%rip), %ecx
    test %ecx, %ecx
    jz 2b
    mov hb_count(%rip), %eax
    xor %edx, %edx
    div %ecx
    test %edx, %edx
    jnz 2b
    call do_verify
    jmp 2b

/* ------------------------------------------------------------------------ */
/* do_pass: one verify+rewrite pass for pass_no, then report. */
do_pass:
    mov pass_no(%rip), %eax
    lea -1(%rax), %ecx
    imul $KEY, %ecx, %ecx
    mov %ecx, key_old(%rip)
    imul $KEY, %eax, %eax
    mov %eax, key_new(%rip)
    movl $str_pass, err_word(%rip)
    mov pass_no(%rip), %eax
    mov %eax, err_number(%rip)
    movl $(RUN_VERIFY | RUN_WRITE), run_flags(%rip)
    cmpl $1, pass_no(%rip)
    jne 1f
    movl $RUN_WRITE, run_flags(%rip)  /* nothing to verify before the first pass */
1:  call run_region
    call print_result
    mov pass_no(%rip), %eax
    cmp corrupt_at(%rip), %eax
    jne 2f
    call corrupt_one_word
2:  call maybe_halt
    ret

/* do_verify: read-only check that the region still holds pattern(pass_no). */
do_verify:
    mov pass_no(%rip), %eax
    imul $KEY, %eax, %eax
    mov %eax, key_old(%rip)
    movl $str_verify, err_word(%rip)
    mov pass_no(%rip), %eax
    mov %eax, err_number(%rip)
    movl $RUN_VERIFY, run_flags(%rip)
    call run_region
    call print_result
    call maybe_halt
    ret

maybe_halt:
    cmpl $0, pass_errors(%rip)
    je 1f
    cmpl $0, onerror_halt(%rip)
    je 1f
    SYSCALL SYS_HALT, $0
1:  ret

/* "vmferry-guest <pass|verify> N ok|bad pages=P ms=T [errors=E]" */
print_result:
    PRINTS "vmferry-guest "
    SYSCALL SYS_PUTS, err_word(%rip)
    PRINTS " "
    PRINTD err_number(%rip)
    cmpl $0, pass_errors(%rip)
    jne 1f
    PRINTS " ok"
    jmp 2f
1:  PRINTS " bad"
2:  PRINTS " pages="
    PRINTD region_pages(%rip)
    PRINTS " ms="
    PRINTD run_ms(%rip)
    cmpl $0, pass_errors(%rip)
    je 3f
    PRINTS " errors="
    PRINTD pass_errors(%rip)
3:  NEWLINE
    ret

/* selftest=corrupt: flip bit 0 of word 5 of the middle page. */
corrupt_one_word:
    mov region_pages(%rip), %ecx
    shr $1, %ecx
    mov %ecx, %eax
    shl $12, %eax
    add $(REGION_START + 5 * 4), %eax
    xorl $1, (%rax)
    PRINTS "vmferry-guest selftest corrupted page "
    PRINTD %ecx
    PRINTS " word 5 addr="
    PRINTX %eax
    NEWLINE
    ret

/* ------------------------------------------------------------------------ */
/* run_region: walk all pages once according to run_flags, using key_old
 * (verify) and key_new (write).  Sets pass_errors and run_ms. */
run_region:
    mov ticks(%rip), %eax
    mov %eax, run_t0(%rip)
    movl $0, pass_errors(%rip)
    movl $0, err_lines(%rip)
    movl $0, page_idx(%rip)
    mov $REGION_START, %esi
1:  call rate_wait
    testl $RUN_VERIFY, run_flags(%rip)
    jz 2f
    call verify_page
    test %rdx, %rdx
    jz 2f
    call report_page
2:  testl $RUN_WRITE, run_flags(%rip)
    jz 3f
    call write_page
3:  add $PAGE_SIZE, %rsi
    mov page_idx(%rip), %eax
    inc %eax
    mov %eax, page_idx(%rip)
    cmp region_pages(%rip), %eax
    jb 1b
    mov ticks(%rip), %eax
    sub run_t0(%rip), %eax
    mov %eax, run_ms(%rip)
    ret

/* rate_wait: in slow mode, sleep until the page budget allows page page_idx:
 * page i may be written once elapsed_ms * pps / 1000 > i, i.e. at tick
 * run_t0 + i * 1000 / pps + 1.  The sleep hlts (no busy loop) so a
 * rate-limited guest leaves the host CPU idle.  Clobbers rax, rcx, rdx. */
rate_wait:
    mov rate_pps(%rip), %ecx
    test %ecx, %ecx
    jz 9f
    testl $RUN_WRITE, run_flags(%rip)
    jz 9f
    mov page_idx(%rip), %eax
    mov $HZ, %edx
    mul %edx                    /* edx:eax = page_idx * 1000 */
    div %ecx                    /* < 2^32 since page_idx < 2^20 */
    add run_t0(%rip), %eax
    inc %eax
    SYSCALL SYS_SLEEP_UNTIL, %eax
9:  ret

/* The page loops work on 64-bit qwords (half the memory operations of a
 * dword loop, which matters under TCG).  Within a CHUNK-aligned chunk the
 * word at chunk+off holds (chunk ^ key) ^ off, so the qword at chunk+off is
 * Q64 ^ offtab[off] with Q64 = (chunk ^ key) replicated into both halves and
 * offtab[off] = off | (off + 4) << 32. */

/* chunk_key: edi = chunk address, eax = key -> rbx = Q64. */
.macro CHUNK_KEY key:req
    mov %edi, %ebx
    xor \key, %ebx
    mov %rbx, %rax
    shl $32, %rax
    or %rax, %rbx
.endm

/* verify_page: rsi = page address.  Returns rdx = OR of (qword ^ expected)
 * over the page, i.e. 0 iff the page holds pattern(key_old).  Branch-free
 * inner loop.  Clobbers rax, rbx, rcx, rdi. */
verify_page:
    mov %rsi, %rdi
    xor %edx, %edx
    mov $(PAGE_SIZE / CHUNK), %ecx
1:  CHUNK_KEY key_old(%rip)
    .set off, 0
    .rept CHUNK / 8
    mov off(%rdi), %rax
    xor %rbx, %rax
    xor offtab + off(%rip), %rax
    or %rax, %rdx
    .set off, off + 8
    .endr
    add $CHUNK, %rdi
    dec %ecx
    jnz 1b
    ret

/* write_page: rsi = page address; store pattern(key_new). Clobbers rax, rbx, rcx, rdi. */
write_page:
    mov %rsi, %rdi
    mov $(PAGE_SIZE / CHUNK), %ecx
1:  CHUNK_KEY key_new(%rip)
    .set off, 0
    .rept CHUNK / 8
    mov %rbx, %rax
    xor offtab + off(%rip), %rax
    mov %rax, off(%rdi)
    .set off, off + 8
    .endr
    add $CHUNK, %rdi
    dec %ecx
    jnz 1b
    ret

/* report_page: the page at rsi failed verification.  Count it and (rate
 * limited) print its first bad word.  Preserves rsi. */
report_page:
    incl pass_errors(%rip)
    cmpl $MAX_ERR_LINES, err_lines(%rip)
    jae 9f
    incl err_lines(%rip)
    xor %ecx, %ecx
1:  lea (%rsi,%rcx,4), %rdi
    mov %edi, %ebx
    xor key_old(%rip), %ebx     /* expected */
    mov (%rdi), %edx            /* got */
    cmp %ebx, %edx
    jne 2f
    inc %ecx
    cmp $WORDS_PER_PAGE, %ecx
    jb 1b
    ret                         /* not reached: verify_page saw a difference */
2:  PRINTS "vmferry-guest ERROR "
    SYSCALL SYS_PUTS, err_word(%rip)
    PRINTS " "
    PRINTD err_number(%rip)
    PRINTS " page "
    PRINTD page_idx(%rip)
    PRINTS " word "
    PRINTD %ecx
    PRINTS " expected "
    PRINTX %ebx
    PRINTS " got "
    PRINTX %edx
    PRINTS " addr="
    PRINTX %edi
    NEWLINE
9:  ret

/* ------------------------------------------------------------------------ */
/* Boot-time setup */
    .set IN_USER, 0

/* Find the end of the usable RAM range containing REGION_START. */
read_multiboot:
    cmpl $MB_BOOT_MAGIC, mb_magic(%rip)
    jne 9f
    mov mb_info(%rip), %ebx
    mov (%rbx), %ecx            /* flags */
    test $0x4, %ecx             /* cmdline valid? */
    jz 1f
    mov 16(%rbx), %eax
    mov %eax, cmdline_ptr(%rip)
1:  test $0x40, %ecx            /* mmap_* valid? */
    jz 5f
    mov 48(%rbx), %esi          /* mmap_addr */
    mov %esi, %edi
    add 44(%rbx), %edi          /* + mmap_length */
2:  cmp %edi, %esi
    jae 5f
    /* entry: size(4) base(8) length(8) type(4); size excludes itself */
    cmpl $1, 20(%rsi)
    jne 4f
    mov 4(%rsi), %rax           /* base */
    cmp $REGION_START, %rax
    ja 4f
    add 12(%rsi), %rax          /* + length = end */
    mov $0xFFFFF000, %edx       /* no higher than 4 GiB: that's what we map */
    cmp %rdx, %rax
    cmova %rdx, %rax
    cmp $REGION_START, %rax
    jbe 4f
    mov %eax, mem_end(%rip)
    ret
4:  add (%rsi), %esi
    add $4, %esi
    jmp 2b
5:  test $0x1, %ecx             /* mem_lower/mem_upper valid? */
    jz 9f
    mov 8(%rbx), %eax           /* KiB above 1 MiB */
    shl $10, %eax
    /* + 1 MiB base - 1 MiB margin: firmware tables live at the top of RAM */
    mov %eax, mem_end(%rip)
9:  ret

/* Parse space separated key=value words from the multiboot command line. */
.macro OPTION name:req, handler:req
    .pushsection .rodata
.Lopt\@: .asciz "\name"
    .popsection
    mov $.Lopt\@, %edi
    call prefix_match
    test %rax, %rax
    jnz \handler
.endm

parse_cmdline:
    mov cmdline_ptr(%rip), %esi
    test %esi, %esi
    jz 9f
1:  cmpb $' ', (%rsi)           /* skip blanks */
    jne 2f
    inc %rsi
    jmp 1b
2:  cmpb $0, (%rsi)
    je 9f
    OPTION "mem=", opt_mem
    OPTION "dirty=", opt_dirty
    OPTION "rate=", opt_rate
    OPTION "hb=", opt_hb
    OPTION "verify=", opt_verify
    OPTION "selftest=corrupt", opt_selftest
    OPTION "onerror=halt", opt_halt
    OPTION "tlbflush=1", opt_tlbflush
next_word:
    cmpb $0, (%rsi)             /* skip to the end of this word */
    je 9f
    cmpb $' ', (%rsi)
    je 1b
    inc %rsi
    jmp next_word
9:  ret

opt_mem:
    call parse_size
    mov %eax, mem_pages(%rip)
    jmp next_word
opt_rate:
    call parse_size
    mov %eax, rate_pps(%rip)
    movl $MODE_SLOW, mode(%rip)
    test %eax, %eax
    jnz next_word
    movl $MODE_FAST, mode(%rip) /* rate=0: unlimited */
    jmp next_word
opt_hb:
    call parse_number
    test %eax, %eax
    jz next_word
    mov %eax, hb_ms(%rip)
    jmp next_word
opt_verify:
    call parse_number
    mov %eax, verify_every(%rip)
    jmp next_word
opt_selftest:
    movl $1, selftest(%rip)
    jmp next_word
opt_halt:
    movl $1, onerror_halt(%rip)
    jmp next_word
opt_tlbflush:
    movl $1, tlbflush(%rip)
    jmp next_word
opt_dirty:
    mov %rax, %rsi              /* still inside this word */
    OPTION "fast", 1f
    OPTION "slow", 2f
    OPTION "idle", 3f
    jmp next_word
1:  movl $MODE_FAST, mode(%rip)
    movl $0, rate_pps(%rip)
    jmp next_word
2:  movl $MODE_SLOW, mode(%rip)
    jmp next_word
3:  movl $MODE_IDLE, mode(%rip)
    jmp next_word

/* prefix_match: rsi = text, rdi = NUL-terminated prefix.
 * rax = text after the prefix if text starts with it, else 0.  Preserves rsi, rdi. */
prefix_match:
    push %rsi
    push %rdi
1:  movb (%rdi), %al
    test %al, %al
    jz 2f
    cmp (%rsi), %al
    jne 3f
    inc %rsi
    inc %rdi
    jmp 1b
2:  mov %rsi, %rax
    jmp 4f
3:  xor %eax, %eax
4:  pop %rdi
    pop %rsi
    ret

/* parse_size: rax = text "N[K|M|G]" -> eax = size in 4 KiB pages (bare N =
 * MiB; K rounds up so a tiny rate doesn't become 0 = "unlimited"). */
parse_size:
    push %rcx
    call parse_number           /* eax = N, ecx = following char | 0x20 */
    cmp $'k', %ecx
    je 1f
    cmp $'g', %ecx
    je 2f
    shl $8, %eax                /* MiB */
    jmp 3f
1:  add $3, %eax
    shr $2, %eax
    jmp 3f
2:  shl $18, %eax
3:  pop %rcx
    ret

/* parse_number: rax = text -> eax = decimal value, ecx = next char | 0x20 */
parse_number:
    push %rsi
    mov %rax, %rsi
    xor %eax, %eax
1:  movzbl (%rsi), %ecx
    sub $'0', %ecx
    cmp $9, %ecx
    ja 2f
    imul $10, %eax, %eax
    add %ecx, %eax
    inc %rsi
    jmp 1b
2:  movzbl (%rsi), %ecx
    or $0x20, %ecx
    pop %rsi
    ret

/* Derive the region and the effective mode from what we parsed. */
setup_config:
    mov mem_end(%rip), %eax
    and $~(PAGE_SIZE - 1), %eax
    cmp $(REGION_START + PAGE_SIZE), %eax
    jb 8f
    sub $REGION_START, %eax
    shr $12, %eax
    mov mem_pages(%rip), %ecx
    test %ecx, %ecx
    jz 1f
    cmp %eax, %ecx
    jae 1f
    mov %ecx, %eax
1:  mov %eax, region_pages(%rip)
    shl $12, %eax
    add $REGION_START, %eax
    mov %eax, region_end(%rip)

    cmpl $MODE_SLOW, mode(%rip)
    jne 2f
    cmpl $0, rate_pps(%rip)
    jne 3f
    movl $SLOW_PPS, rate_pps(%rip)
    jmp 3f
2:  movl $0, rate_pps(%rip)     /* fast and idle are never rate limited */
3:  movl $2, corrupt_at(%rip)
    cmpl $MODE_IDLE, mode(%rip)
    jne 4f
    movl $1, corrupt_at(%rip)
4:  cmpl $0, selftest(%rip)
    jne 5f
    movl $0, corrupt_at(%rip)   /* "after pass 0" never happens: no corruption */
5:  ret
8:  PRINTS "vmferry-guest FATAL no usable memory above 2 MiB (no multiboot memory info?)"
    NEWLINE
    SYSCALL SYS_HALT, $0

print_start:
    cmpl $0, cmdline_ptr(%rip)
    je 1f
    PRINTS "vmferry-guest cmdline "
    SYSCALL SYS_PUTS, cmdline_ptr(%rip)
    NEWLINE
1:  PRINTS "vmferry-guest start pages="
    PRINTD region_pages(%rip)
    PRINTS " base="
    PRINTX $REGION_START
    PRINTS " end="
    PRINTX region_end(%rip)
    PRINTS " mode="
    mov mode(%rip), %eax
    mov $mode_names, %ecx
    mov (%rcx,%rax,4), %ecx
    SYSCALL SYS_PUTS, %ecx
    PRINTS " pps="
    PRINTD rate_pps(%rip)
    PRINTS " hb="
    PRINTD hb_ms(%rip)
    PRINTS " verify="
    PRINTD verify_every(%rip)
    PRINTS " selftest="
    PRINTD selftest(%rip)
    cmpl $0, onerror_halt(%rip)
    jne 2f
    PRINTS " onerror=go"
    jmp 3f
2:  PRINTS " onerror=halt"
3:  PRINTS " tlbflush="
    PRINTD tlbflush(%rip)
    NEWLINE
    ret

/* ------------------------------------------------------------------------ */
/* Hardware: UART, IDT, PIC, PIT */

serial_init:
    mov $(COM1 + 1), %dx
    xor %al, %al
    out %al, %dx                /* no UART interrupts: we poll */
    mov $(COM1 + 3), %dx
    mov $0x80, %al
    out %al, %dx                /* DLAB */
    mov $(COM1 + 0), %dx
    mov $1, %al
    out %al, %dx                /* divisor 1 = 115200 baud */
    mov $(COM1 + 1), %dx
    xor %al, %al
    out %al, %dx
    mov $(COM1 + 3), %dx
    mov $0x03, %al
    out %al, %dx                /* 8N1, DLAB off */
    mov $(COM1 + 2), %dx
    mov $0xC7, %al
    out %al, %dx                /* enable + clear FIFOs */
    mov $(COM1 + 4), %dx
    mov $0x03, %al
    out %al, %dx                /* DTR | RTS */
    ret

/* 256 64-bit interrupt gates: 0-31 -> exc_stubs (but 6 = #UD -> ud_entry,
 * the system call entry), 32 (IRQ0) -> irq0_handler, the rest -> irq_ignore. */
idt_init:
    mov $idt, %edi
    xor %ecx, %ecx
1:  cmp $32, %ecx
    jae 2f
    mov %ecx, %eax
    shl $4, %eax
    add $exc_stubs, %eax
    cmp $6, %ecx
    jne 4f
    mov $ud_entry, %eax
    jmp 4f
2:  jne 3f
    mov $irq0_handler, %eax
    jmp 4f
3:  mov $irq_ignore, %eax
4:  mov %ax, (%rdi)                 /* offset 15:0 */
    movw $SEL_CODE64, 2(%rdi)
    movw $0x8E00, 4(%rdi)           /* present, DPL 0, interrupt gate, IST 0 */
    shr $16, %eax
    mov %ax, 6(%rdi)                /* offset 31:16 */
    movl $0, 8(%rdi)                /* offset 63:32 */
    movl $0, 12(%rdi)
    add $16, %rdi
    inc %ecx
    cmp $256, %ecx
    jb 1b
    lidt idt_desc(%rip)
    ret

/* 64-bit TSS: only RSP0 matters (the kernel stack for interrupts from ring 3). */
tss_init:
    mov $stack_top, %eax
    mov %eax, tss + 4(%rip)         /* rsp0 */
    movw $104, tss + 102(%rip)      /* I/O bitmap offset = limit: no bitmap */
    /* 16-byte system descriptor: limit 103, base = tss, type 0x89 (available 64-bit TSS) */
    mov $tss, %eax
    mov %eax, %edx
    shl $16, %eax
    or $103, %eax
    mov %eax, gdt_tss(%rip)         /* limit 15:0, base 15:0 */
    mov %edx, %eax
    shr $16, %eax
    and $0xFF, %eax                 /* base 23:16 */
    or $0x8900, %eax                /* present, type 9 */
    mov %edx, %ecx
    and $0xFF000000, %ecx           /* base 31:24 */
    or %ecx, %eax
    mov %eax, gdt_tss + 4(%rip)
    movl $0, gdt_tss + 8(%rip)
    movl $0, gdt_tss + 12(%rip)
    mov $SEL_TSS, %ax
    ltr %ax
    ret

pic_pit_init:
    /* Route the 8259 to the CPU through the local APIC in virtual wire mode
     * (LINT0 = ExtINT).  SeaBIOS does this, minimal firmware like qboot does
     * not, and then no timer interrupt ever arrives. */
    mov $0x1B, %ecx                 /* IA32_APIC_BASE */
    rdmsr
    test $0x800, %eax               /* APIC globally enabled? */
    jz 1f
    and $0xFFFFF000, %eax
    movl $0x1FF, 0xF0(%rax)         /* SVR: software enable, spurious vector 0xFF */
    movl $0x700, 0x350(%rax)        /* LVT LINT0: ExtINT, unmasked */
    movl $0x400, 0x360(%rax)        /* LVT LINT1: NMI */
1:
    /* Remap the 8259s to vectors 32-47 (away from CPU exceptions) and mask
     * everything except IRQ0. */
    mov $0x11, %al
    out %al, $0x20
    out %al, $0xA0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xA1
    mov $0x04, %al
    out %al, $0x21
    mov $0x02, %al
    out %al, $0xA1
    mov $0x01, %al
    out %al, $0x21
    out %al, $0xA1
    mov $0xFE, %al
    out %al, $0x21
    mov $0xFF, %al
    out %al, $0xA1
    /* PIT channel 0, lobyte/hibyte, mode 2 (rate generator) at HZ */
    mov $0x34, %al
    out %al, $0x43
    mov $(PIT_DIVISOR & 0xFF), %al
    out %al, $0x40
    mov $(PIT_DIVISOR >> 8), %al
    out %al, $0x40
    ret

irq0_handler:
    push %rax
    cmpl $0, tlbflush(%rip)
    je 1f
    mov %cr3, %rax              /* tlbflush=1: drop every TLB entry (see top) */
    mov %rax, %cr3
1:  incl ticks(%rip)            /* after the flush: this write is dirty-logged */
    mov $0x20, %al
    out %al, $0x20              /* EOI */
    pop %rax
    iretq

irq_ignore:                     /* masked lines / spurious IRQ7: nothing to do */
    iretq

/* #UD: a UD2 executed in ring 3 is a system call (see SYS_* above); anything
 * else is fatal.  Interrupt gate, so IF=0 in here.  Frame: rip, cs, rflags, ... */
ud_entry:
    push %rax
    testb $3, 16(%rsp)              /* from ring 3? */
    jz 1f
    mov 8(%rsp), %rax
    cmpw $0x0B0F, (%rax)            /* UD2 = 0F 0B */
    jne 1f
    addq $2, 8(%rsp)                /* resume after the UD2 */
    pop %rax
    call syscall_dispatch
    iretq
1:  pop %rax
    pushq $0
    pushq $6
    jmp fatal_exception

syscall_dispatch:
    cmp $SYS_PUTC, %r10d
    je putc
    cmp $SYS_PUTS, %r10d
    je puts
    cmp $SYS_PUTDEC, %r10d
    je putdec
    cmp $SYS_PUTHEX, %r10d
    je puthex
    cmp $SYS_HALT, %r10d
    je halt_forever
    cmp $SYS_SLEEP_UNTIL, %r10d
    jne 9f
    pushf
    cli
1:  mov ticks(%rip), %r10d      /* check with IF=0, then sti;hlt: the sti   */
    sub %r11d, %r10d            /* shadow makes the pair atomic, so a tick  */
    jns 2f                      /* can't slip in between check and hlt     */
    sti
    hlt
    cli
    jmp 1b
2:  popf
9:  ret

/* Exception stubs, 16 bytes apart so idt_init can compute their address.
 * Each leaves [vector][error code][rip]... on the stack. */
    .balign 16
exc_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0                    /* no CPU error code: push a dummy */
    .endif
    pushq $vec
    jmp fatal_exception
    .set vec, vec + 1
    .endr

fatal_exception:
    pop %rax                    /* vector */
    pop %rbx                    /* error code */
    pop %rcx                    /* faulting rip */
    PRINTS "vmferry-guest FATAL exception "
    PRINTD %eax
    PRINTS " err="
    PRINTX %ebx
    PRINTS " rip="
    PRINTX %ecx
    NEWLINE
    /* fall through */
halt_forever:
    PRINTS "vmferry-guest halted"
    NEWLINE
    cli
1:  hlt
    jmp 1b

/* ------------------------------------------------------------------------ */
/* Serial output (polled).  Argument in r11; all other registers preserved. */

putc:                           /* r11b = character */
    push %rax
    push %rdx
    mov $(COM1 + 5), %dx
1:  in %dx, %al
    test $0x20, %al             /* transmit holding register empty? */
    jz 1b
    mov %r11d, %eax
    mov $COM1, %dx
    out %al, %dx
    pop %rdx
    pop %rax
    ret

puts:                           /* r11 = NUL-terminated string */
    push %rsi
    mov %r11, %rsi
1:  movzbl (%rsi), %r11d
    test %r11d, %r11d
    jz 2f
    call putc
    inc %rsi
    jmp 1b
2:  pop %rsi
    ret

putdec:                         /* r11d = unsigned value */
    push %rax
    push %rcx
    push %rdx
    push %rdi
    mov %r11d, %eax
    mov $numbuf_end, %edi
    movb $0, (%rdi)
    mov $10, %ecx
1:  xor %edx, %edx
    div %ecx
    add $'0', %dl
    dec %rdi
    mov %dl, (%rdi)
    test %eax, %eax
    jnz 1b
    mov %rdi, %r11
    call puts
    pop %rdi
    pop %rdx
    pop %rcx
    pop %rax
    ret

puthex:                         /* r11d = value, printed as 8 hex digits */
    push %rcx
    push %rdx
    push %rsi
    mov %r11d, %edx
    mov $hexdigits, %esi
    mov $8, %ecx
1:  rol $4, %edx
    mov %edx, %r11d
    and $0xF, %r11d
    movzbl (%rsi,%r11), %r11d
    call putc
    dec %ecx
    jnz 1b
    pop %rsi
    pop %rdx
    pop %rcx
    ret

/* ------------------------------------------------------------------------ */
    .section .rodata
    .balign 64
offtab:                         /* qword at off: off | (off + 4) << 32 */
    .set off, 0
    .rept CHUNK / 8
    .long off, off + 4
    .set off, off + 8
    .endr
hexdigits:  .ascii "0123456789abcdef"
str_pass:   .asciz "pass"
str_verify: .asciz "verify"
str_fast:   .asciz "fast"
str_slow:   .asciz "slow"
str_idle:   .asciz "idle"
    .balign 4
mode_names: .long str_fast, str_slow, str_idle

    .balign 4
idt_desc:
    .word 256 * 16 - 1
    .long idt, 0                /* 64-bit base (we live below 4 GiB) */

    .data
    .balign 8
gdt:                            /* writable: tss_init fills in the TSS descriptor */
    .quad 0
    .quad 0x00CF9A000000FFFF    /* 0x08: 32-bit code, flat 4 GiB */
    .quad 0x00CF92000000FFFF    /* 0x10: data, flat 4 GiB */
    .quad 0x00AF9A000000FFFF    /* 0x18: 64-bit code */
    .quad 0x00CFF2000000FFFF    /* 0x20: user data (DPL 3) */
    .quad 0x00AFFA000000FFFF    /* 0x28: user 64-bit code (DPL 3) */
gdt_tss:
    .quad 0, 0                  /* 0x30: 64-bit TSS (16 bytes) */
gdt_end:
    .balign 4
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
    .balign 4
hb_ms:          .long 1000
mode:           .long MODE_FAST
mem_pages:      .long 0         /* 0 = no mem= cap */
rate_pps:       .long 0         /* pages per second, 0 = unlimited */

    .bss
    .balign 4096
pml4:           .skip 4096
pdpt:           .skip 4096
pd:             .skip 4 * 4096
idt:            .skip 256 * 16
tss:            .skip 104
mb_magic:       .skip 4
mb_info:        .skip 4
cmdline_ptr:    .skip 4
mem_end:        .skip 4
region_pages:   .skip 4
region_end:     .skip 4
verify_every:   .skip 4
selftest:       .skip 4
onerror_halt:   .skip 4
tlbflush:       .skip 4
corrupt_at:     .skip 4
ticks:          .skip 4         /* incremented by IRQ0 at HZ */
pass_no:        .skip 4
key_old:        .skip 4
key_new:        .skip 4
run_flags:      .skip 4
run_t0:         .skip 4
run_ms:         .skip 4
page_idx:       .skip 4
pass_errors:    .skip 4
err_lines:      .skip 4
err_word:       .skip 4
err_number:     .skip 4
next_hb:        .skip 4
hb_count:       .skip 4
numbuf:         .skip 15
numbuf_end:     .skip 1
    .balign 16
stack:          .skip 16384     /* ring 0: boot, interrupts, syscalls */
stack_top:
user_stack:     .skip 16384     /* ring 3 worker */
user_stack_top:

    .section .note.GNU-stack, "", @progbits
