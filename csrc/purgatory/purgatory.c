/* nodeagent purgatory: check the SHA-256 of the loaded segments before starting the new kernel.
 * Freestanding; compiled position-independent so that only RIP-relative addressing is used (build.py refuses an
 * object with absolute relocations).  agent/kexec/loader.py finds `purgatory_params` in the blob by its magic and
 * fills it in. */

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long u64;

#define MAX_REGIONS 8

struct region {
	u64 start;
	u64 len;
	u8 sha256[32];
};

/* Layout known to agent/kexec/loader.py: keep them in step. */
struct params {
	u8 magic[8];		/* "NAPURG01" */
	u64 entry;		/* +8: the kernel's 64-bit entry */
	u64 zero_page;		/* +16: RSI for the kernel */
	u64 nregions;		/* +24 */
	struct region regions[MAX_REGIONS];	/* +32, 48 bytes each */
};

__attribute__((used, aligned(16))) struct params purgatory_params = {
	.magic = {'N', 'A', 'P', 'U', 'R', 'G', '0', '1'},
};

static const u32 K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline u32 ror(u32 x, int n) { return (x >> n) | (x << (32 - n)); }

static void block(u32 h[8], const u8 *p)
{
	u32 w[64], a, b, c, d, e, f, g, k, t1, t2;
	int i;

	for (i = 0; i < 16; i++)
		w[i] = (u32)p[4 * i] << 24 | (u32)p[4 * i + 1] << 16 | (u32)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (i = 16; i < 64; i++) {
		u32 s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
		u32 s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
	for (i = 0; i < 64; i++) {
		t1 = k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
		t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
	}
	h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

void sha256(const u8 *data, u64 len, u8 out[32])
{
	u32 h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	u8 tail[128];
	u64 n = len & ~63UL, rest = len - n, i, bits = len * 8;
	int j;

	for (i = 0; i < n; i += 64)
		block(h, data + i);
	for (i = 0; i < 128; i++)
		tail[i] = 0;
	for (i = 0; i < rest; i++)
		tail[i] = data[n + i];
	tail[rest] = 0x80;
	n = rest < 56 ? 64 : 128;
	for (j = 0; j < 8; j++)
		tail[n - 1 - j] = (u8)(bits >> (8 * j));
	block(h, tail);
	if (n == 128)
		block(h, tail + 64);
	for (j = 0; j < 8; j++) {
		out[4 * j] = h[j] >> 24; out[4 * j + 1] = h[j] >> 16; out[4 * j + 2] = h[j] >> 8; out[4 * j + 3] = h[j];
	}
}

static inline void outb(u8 v, unsigned short port) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(unsigned short port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void say(const char *s)	/* COM1, as the firmware left it; best effort */
{
	int spin;

	for (; *s; s++) {
		for (spin = 0; spin < 100000 && !(inb(0x3fd) & 0x20); spin++)
			;
		outb((u8)*s, 0x3f8);
	}
}

void purgatory_main(void)
{
	u8 digest[32];
	u64 i, j;

	for (i = 0; i < purgatory_params.nregions && i < MAX_REGIONS; i++) {
		struct region *r = &purgatory_params.regions[i];
		sha256((const u8 *)r->start, r->len, digest);
		for (j = 0; j < 32; j++)
			if (digest[j] != r->sha256[j]) {
				say("\r\nnodeagent purgatory: SHA-256 mismatch, halting\r\n");
				for (;;)
					__asm__ volatile("cli; hlt");
			}
	}
}
