/* nodeagent purgatory entry (x86_64).  The kernel's relocate_kernel enters here in 64-bit mode, interrupts off,
 * on page tables that identity-map RAM, after copying the kexec_load segments to their places.  The GDT it leaves
 * loaded is not mapped any more, so we load our own (boot protocol: __BOOT_CS 0x10, __BOOT_DS 0x18, flat), take
 * our own stack, check the SHA-256 digests (purgatory_main, in C; it halts on a mismatch) and jump to the kernel's
 * 64-bit entry with RSI = the zero page.  Everything is RIP-relative: the blob runs wherever it is loaded. */

	.section .text.entry, "ax"
	.code64
	.globl	purgatory_start
purgatory_start:
	cli
	cld
	leaq	stack_top(%rip), %rsp
	leaq	gdt(%rip), %rax
	movq	%rax, gdt_base(%rip)
	lgdt	gdt_limit(%rip)
	pushq	$0x10
	leaq	1f(%rip), %rax
	pushq	%rax
	lretq
1:	movl	$0x18, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	call	purgatory_main
	movq	purgatory_params+16(%rip), %rsi		/* zero page */
	movq	purgatory_params+8(%rip), %rax		/* kernel 64-bit entry */
	xorl	%ebx, %ebx
	xorl	%ecx, %ecx
	xorl	%edx, %edx
	xorl	%edi, %edi
	xorl	%ebp, %ebp
	jmpq	*%rax

	.data
	.balign	16
gdt:
	.quad	0
	.quad	0
	.quad	0x00af9a000000ffff	/* 0x10: 64-bit code, flat */
	.quad	0x00cf92000000ffff	/* 0x18: data, flat */
gdt_end:
	.balign	16
	.word	0, 0, 0
gdt_limit:
	.word	gdt_end - gdt - 1
gdt_base:
	.quad	0

	.balign	16
stack:
	.fill	8192, 1, 0
stack_top:
	.section .note.GNU-stack,"",@progbits
