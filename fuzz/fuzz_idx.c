/*
 * fuzz_idx.c - libFuzzer target: the IDX loader ef_idx_read (src/train/data.c, the MNIST and
 * Fashion-MNIST files), plain and gzipped (issue 14).
 * Input: byte 0 is a flag byte, the rest the file.
 *   bit 0: want_ndim 3 (images) instead of 1 (labels)
 *   bit 1: the file is gzipped here (zlib, level from bits 2-3) so the reader's gzip path sees
 *          valid streams of any content; without it the bytes are written as they are, which
 *          reaches the damaged-stream paths when they start like gzip (1f 8b).
 *   bit 4: a second file, "labels", is written too (its 1 + 4 bytes of header taken from
 *          the input) so that ef_image_set_load reads a pair.
 * Accepted: ndim and dims as asked (each >= 1), bytes their product, data equal to the bytes
 * after the header. Refused: a status other than OK, a message, and *out zeroed.
 * Build: `./run.sh fuzz`; corpus in fuzz/corpus/idx.
 */
#include "fuzz_util.h"

#include "eformer.h"
#include "train/tasks.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

static void write_gz(const char *path, const uint8_t *data, size_t n, int level) {
    char mode[4] = {'w', 'b', (char)('0' + level), 0};
    gzFile g = gzopen(path, mode);
    if (!g || (n && gzwrite(g, data, (unsigned)n) != (int)n) || gzclose(g) != Z_OK) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int flags = data[0], want = flags & 1 ? 3 : 1;
    const uint8_t *file = data + 1;
    size_t n = size - 1;
    const char *path = fuzz_path("train-images-idx3-ubyte");
    if (flags & 2)
        write_gz(path, file, n, (flags >> 2) & 3);
    else
        fuzz_write(path, file, n);

    ef_idx x;
    memset(&x, 0x5a, sizeof x);
    ef_status st = ef_idx_read(path, want, &x);
    if (st != EF_OK) {
        if (!ef_last_error()[0] || x.data || x.bytes || x.ndim) abort();
    } else {
        size_t h = 4 + 4 * (size_t)want, prod = 1;
        if (x.ndim != want || !x.data) abort();
        for (int d = 0; d < want; d++) {
            if (x.dims[d] < 1) abort();
            prod *= (size_t)x.dims[d];
        }
        if (prod != x.bytes) abort();
        /* the header and data are the file's bytes, unless raw bytes were themselves gzip
         * (then they are read decompressed) */
        if ((flags & 2) || n < 2 || file[0] != 0x1f || file[1] != 0x8b) {
            if (n != h + x.bytes || memcmp(x.data, file + h, x.bytes)) abort();
            for (int d = 0; d < want; d++) {
                const uint8_t *p = file + 4 + 4 * d;
                if (x.dims[d] != ((int64_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3])) abort();
            }
        }
        ef_idx_free(&x);
        if (x.data || x.bytes) abort();
    }

    /* the pair: images as above, labels = a 1-dim header for the same count + some bytes */
    if ((flags & 16) && want == 3 && n >= 16) {
        uint8_t lab[64] = {0, 0, 8, 1};
        size_t ln = 8 + (n - 16 < 56 ? n - 16 : 56);
        memcpy(lab + 4, file + 4, 4); /* the images' count */
        memcpy(lab + 8, file + 16, ln - 8);
        fuzz_write(fuzz_path("train-labels-idx1-ubyte"), lab, ln);
        char dir[128];
        snprintf(dir, sizeof dir, "%s", path);
        *strrchr(dir, '/') = 0;
        ef_image_set s;
        st = ef_image_set_load(dir, "train", &s);
        if (st != EF_OK) {
            if (!ef_last_error()[0] || s.images || s.labels) abort();
        } else {
            if (s.n < 1 || s.rows < 1 || s.cols < 1) abort();
            for (int64_t i = 0; i < s.n; i++)
                if (s.labels[i] > 9) abort();
            ef_image_set_free(&s);
        }
        unlink(fuzz_path("train-labels-idx1-ubyte"));
    }
    return 0;
}
