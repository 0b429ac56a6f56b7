/*
 * layout.c - `eformer layout`: the attention pattern of a mechanism, as numbers and a picture.
 *
 * Makes the plan for SPEC at (batch 1, H heads, N queries, M keys, head_dim 64), prints the
 * canonical spec and, per head, the visible pairs (ef_attn_visible_pairs), the density
 * pairs / (N M) and the mean visible keys per query; with --png draws the pattern of the first
 * heads side by side (queries down, keys across, visible dark, invisible white, a grey column
 * between heads), one pixel per pair or, past --px pixels, one pixel per f x f block of pairs
 * whose grey level is the fraction of it that is visible (exact, or an 8 x 8 sample when the
 * grid is too large to ask about every pair).
 *
 * The PNG is written row by row with libpng (memory O(width), whatever N and M); without
 * libpng at build time (EF_HAVE_PNG undefined) --png is refused.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef EF_HAVE_PNG
#include <png.h>
#include <sys/stat.h>
#endif

#define LAYOUT_MAX_DRAWN 8                     /* heads in the picture, at most */
#define LAYOUT_EXACT_PAIRS ((int64_t)64 << 20) /* ask about every pair up to this many */
#define LAYOUT_SAMPLES 8                       /* else an 8 x 8 grid of pairs per pixel */
#define LAYOUT_PX_DEFAULT 1024
#define LAYOUT_PX_MAX 16384
#define LAYOUT_GREY_SEP 160 /* the separator column between heads */

/* Where the pairs of the grid fall in the picture. */
typedef struct layout_geom {
    int n, m;       /* queries, keys */
    int drawn;      /* heads drawn (the first ones) */
    int f;          /* one pixel covers f queries x f keys (the last row/column fewer) */
    int rows, cols; /* pixels of one head */
    int width;      /* drawn * cols + (drawn - 1) separator columns */
    int exact;      /* 1: every pair asked; 0: LAYOUT_SAMPLES^2 per pixel */
} layout_geom;

static layout_geom layout_geometry(int n, int m, int heads, int px) {
    layout_geom g;
    g.n = n;
    g.m = m;
    g.drawn = heads < LAYOUT_MAX_DRAWN ? heads : LAYOUT_MAX_DRAWN;
    int big = n > m ? n : m;
    /* one integer factor for both axes: the aspect ratio is kept and every pixel covers the same
     * block of pairs, so a periodic pattern does not beat against uneven bins */
    g.f = (int)(((int64_t)big + px - 1) / px);
    g.rows = (int)(((int64_t)n + g.f - 1) / g.f);
    g.cols = (int)(((int64_t)m + g.f - 1) / g.f);
    g.width = g.drawn * g.cols + g.drawn - 1;
    g.exact = (int64_t)n * m * g.drawn <= LAYOUT_EXACT_PAIRS;
    return g;
}

#ifdef EF_HAVE_PNG
/* The grey level of a pixel in which `vis` of `area` pairs are visible (0 black .. 255 white). */
static unsigned char grey_of(int64_t vis, int64_t area) {
    return (unsigned char)(255 - (int)((255 * vis + area / 2) / area));
}

/* Fills one pixel row `r` of the picture (g->width bytes). In exact mode adds the visible pairs
 * found to counted[h]. Returns EF_OK or the library's error (ef_attn_visible said -1). */
static ef_status layout_row(const ef_attn *a, const layout_geom *g, int r, unsigned char *out,
                            int64_t *counted) {
    int64_t i0 = (int64_t)r * g->f, i1 = i0 + g->f < g->n ? i0 + g->f : g->n;
    int64_t rh = i1 - i0;
    for (int h = 0; h < g->drawn; h++) {
        unsigned char *px = out + (size_t)h * (g->cols + 1);
        if (h > 0) px[-1] = LAYOUT_GREY_SEP;
        for (int c = 0; c < g->cols; c++) {
            int64_t j0 = (int64_t)c * g->f, j1 = j0 + g->f < g->m ? j0 + g->f : g->m;
            int64_t cw = j1 - j0, vis = 0, area;
            if (g->exact) {
                for (int64_t i = i0; i < i1; i++)
                    for (int64_t j = j0; j < j1; j++) {
                        int v = ef_attn_visible(a, h, (int)i, (int)j);
                        if (v < 0) return EF_ERR_ARG;
                        vis += v;
                    }
                area = rh * cw;
                counted[h] += vis;
            } else {
                /* the centres of an si x sj grid over the block: fixed, so runs repeat */
                int64_t si = rh < LAYOUT_SAMPLES ? rh : LAYOUT_SAMPLES;
                int64_t sj = cw < LAYOUT_SAMPLES ? cw : LAYOUT_SAMPLES;
                for (int64_t p = 0; p < si; p++) {
                    int64_t i = i0 + (2 * p + 1) * rh / (2 * si);
                    for (int64_t q = 0; q < sj; q++) {
                        int64_t j = j0 + (2 * q + 1) * cw / (2 * sj);
                        int v = ef_attn_visible(a, h, (int)i, (int)j);
                        if (v < 0) return EF_ERR_ARG;
                        vis += v;
                    }
                }
                area = si * sj;
            }
            px[c] = grey_of(vis, area);
        }
    }
    return EF_OK;
}

/* What the libpng callbacks and the row loop share. */
typedef struct png_job {
    const ef_attn *a;
    const layout_geom *g;
    unsigned char *row; /* g->width bytes */
    int64_t *counted;   /* [g->drawn] visible pairs seen (exact mode) */
    const char *desc;   /* tEXt Description */
    ef_status lib_st;   /* a library failure while drawing */
    char err[256];      /* libpng's message when it failed */
} png_job;

static void png_on_error(png_structp png, png_const_charp msg) {
    png_job *job = (png_job *)png_get_error_ptr(png);
    snprintf(job->err, sizeof job->err, "%s", msg ? msg : "unknown error");
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    fprintf(stderr, "eformer: layout: libpng warning: %s\n", msg ? msg : "?");
}

/* Header, rows, end. Kept out of png_encode (which holds the setjmp) so that no local variable
 * here is live across the longjmp. Returns 0, or 1 after a library failure (job->lib_st). */
__attribute__((noinline)) static int png_emit(png_structp png, png_infop info, FILE *f,
                                              png_job *job) {
    const layout_geom *g = job->g;
    png_init_io(png, f);
    png_set_IHDR(png, info, (png_uint_32)g->width, (png_uint_32)g->rows, 8, PNG_COLOR_TYPE_GRAY,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    char key_sw[] = "Software", key_desc[] = "Description";
    char sw[64];
    snprintf(sw, sizeof sw, "eformer %s layout", ef_version());
    png_text text[2];
    memset(text, 0, sizeof text);
    text[0].compression = PNG_TEXT_COMPRESSION_NONE;
    text[0].key = key_sw;
    text[0].text = sw;
    text[1].compression = PNG_TEXT_COMPRESSION_NONE;
    text[1].key = key_desc;
    text[1].text = (char *)job->desc;
    png_set_text(png, info, text, 2);
    png_write_info(png, info);
    for (int r = 0; r < g->rows; r++) {
        ef_status st = layout_row(job->a, g, r, job->row, job->counted);
        if (st) {
            job->lib_st = st;
            return 1;
        }
        png_write_row(png, job->row);
    }
    png_write_end(png, info);
    return 0;
}

/* Encodes the picture into f. Returns 0, 1 (library failure: job->lib_st) or -1 (libpng
 * failure: job->err). */
static int png_encode(FILE *f, png_job *job) {
    png_structp png =
        png_create_write_struct(PNG_LIBPNG_VER_STRING, job, png_on_error, png_on_warning);
    if (!png) {
        snprintf(job->err, sizeof job->err, "png_create_write_struct failed (out of memory?)");
        return -1;
    }
    png_infop info = png_create_info_struct(png);
    if (!info) {
        png_destroy_write_struct(&png, NULL);
        snprintf(job->err, sizeof job->err, "png_create_info_struct failed (out of memory?)");
        return -1;
    }
    int rc;
    if (setjmp(png_jmpbuf(png)))
        rc = -1; /* png and info were not changed after setjmp: still valid here */
    else
        rc = png_emit(png, info, f, job);
    png_destroy_write_struct(&png, &info);
    return rc;
}
#endif

/* Draws the picture into `path`. Returns a CLI status (messages printed). */
static int layout_png(const ef_attn *a, const layout_geom *g, const char *path, int64_t *counted) {
#ifndef EF_HAVE_PNG
    (void)a, (void)g, (void)counted;
    fprintf(stderr,
            "eformer: layout: cannot write '%s': this eformer was built without libpng; "
            "install libpng-dev and rebuild\n",
            path);
    return CLI_FAIL;
#else
    char desc[1024];
    ef_attn_shape sh = ef_attn_get_shape(a);
    snprintf(desc, sizeof desc,
             "attention pattern of %s; heads 0-%d of %d side by side; q_len %d (down), kv_len "
             "%d (across); one pixel = %d x %d pairs; grey = fraction visible (%s), black = all",
             ef_attn_describe(a), g->drawn - 1, sh.heads, g->n, g->m, g->f, g->f,
             g->exact ? "exact" : "8 x 8 sample");

    png_job job;
    memset(&job, 0, sizeof job);
    job.a = a;
    job.g = g;
    job.counted = counted;
    job.desc = desc;
    job.row = malloc((size_t)g->width);
    if (!job.row) {
        fprintf(stderr, "eformer: layout: out of memory for a %d-pixel row\n", g->width);
        return CLI_FAIL;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "eformer: layout: cannot open '%s' for writing: %s\n", path,
                strerror(errno));
        free(job.row);
        return CLI_FAIL;
    }
    /* a half-written picture is removed, but only a regular file (never /dev/stdout & co) */
    struct stat stt;
    int regular = fstat(fileno(f), &stt) == 0 && S_ISREG(stt.st_mode);

    int rc = png_encode(f, &job);
    int status = CLI_OK;
    if (rc == 1) {
        cli_lib_error(job.lib_st, "asking the plan which pairs are visible (ef_attn_visible)");
        status = CLI_FAIL;
    } else if (rc < 0) {
        fprintf(stderr, "eformer: layout: writing '%s': libpng: %s\n", path, job.err);
        status = CLI_FAIL;
    }
    if (status == CLI_OK && ferror(f)) {
        fprintf(stderr, "eformer: layout: writing '%s' failed\n", path);
        status = CLI_FAIL;
    }
    errno = 0;
    if (fclose(f) != 0 && status == CLI_OK) {
        fprintf(stderr, "eformer: layout: writing '%s': %s\n", path, strerror(errno));
        status = CLI_FAIL;
    }
    if (status != CLI_OK && regular) remove(path);
    free(job.row);
    return status;
#endif
}

int cli_layout(int argc, char **argv) {
    enum { O_LEN, O_KV, O_HEADS, O_PNG, O_PX, O_HELP, N_OPTS };
    cli_opt opts[N_OPTS] = {
        [O_LEN] = {"len", 1, NULL}, [O_KV] = {"kv-len", 1, NULL}, [O_HEADS] = {"heads", 1, NULL},
        [O_PNG] = {"png", 1, NULL}, [O_PX] = {"px", 1, NULL},     [O_HELP] = {"help", 0, NULL},
    };
    /* SPEC is the first argument; everything after it is an option */
    const char *spec = argc >= 2 && argv[1][0] != '-' ? argv[1] : NULL;
    int rc = cli_parse_opts("layout", argc, argv, spec ? 2 : 1, opts, N_OPTS);
    if (rc) return rc;
    if (opts[O_HELP].value) {
        cli_usage(stdout, "layout");
        return CLI_OK;
    }
    if (!spec)
        return cli_usage_error("layout", "layout: missing SPEC (the first argument), e.g. "
                                         "`eformer layout flash:causal=1 --len 1024`");
    if (!opts[O_LEN].value) return cli_usage_error("layout", "layout: --len N is required");

    int n = 0, m = 0, heads = 1, px = LAYOUT_PX_DEFAULT;
    if ((rc = cli_parse_int("layout", "len", opts[O_LEN].value, 1, INT_MAX, &n))) return rc;
    m = n;
    if (opts[O_KV].value &&
        (rc = cli_parse_int("layout", "kv-len", opts[O_KV].value, 1, INT_MAX, &m)))
        return rc;
    if (opts[O_HEADS].value &&
        (rc = cli_parse_int("layout", "heads", opts[O_HEADS].value, 1, INT_MAX, &heads)))
        return rc;
    if (opts[O_PX].value &&
        (rc = cli_parse_int("layout", "px", opts[O_PX].value, 1, LAYOUT_PX_MAX, &px)))
        return rc;
    if (opts[O_PX].value && !opts[O_PNG].value)
        return cli_usage_error("layout", "layout: --px only sizes the picture of --png FILE");
    const char *png_path = opts[O_PNG].value;
#ifndef EF_HAVE_PNG
    if (png_path) /* refuse before any work */
        return layout_png(NULL, NULL, png_path, NULL);
#endif

    ef_attn_shape shape = {1, heads, n, m, 64, 64};
    ef_attn *a = NULL;
    ef_status st = ef_attn_new(&a, spec, &shape);
    if (st) {
        char ctx[160];
        snprintf(ctx, sizeof ctx, "making the plan for heads %d, len %d, kv-len %d", heads, n, m);
        cli_lib_error(st, ctx);
        return CLI_FAIL;
    }
    int64_t *pairs = calloc((size_t)heads, sizeof *pairs);
    int64_t counted[LAYOUT_MAX_DRAWN] = {0};
    if (!pairs) {
        fprintf(stderr, "eformer: layout: out of memory for %d heads\n", heads);
        ef_attn_free(a);
        return CLI_FAIL;
    }

    const double grid = (double)n * (double)m;
    printf("spec:   %s\n", ef_attn_describe(a));
    printf("shape:  heads %d, q_len %d, kv_len %d (batch 1, head_dim 64, v_dim 64)\n", heads, n, m);
    printf("%-5s %18s %9s %12s\n", "head", "visible pairs", "density", "keys/query");
    double total = 0;
    for (int h = 0; h < heads; h++) {
        pairs[h] = ef_attn_visible_pairs(a, h);
        if (pairs[h] < 0) {
            char ctx[64];
            snprintf(ctx, sizeof ctx, "counting the visible pairs of head %d", h);
            cli_lib_error(EF_ERR_ARG, ctx);
            rc = CLI_FAIL;
            goto done;
        }
        total += (double)pairs[h];
        printf("%-5d %18lld %8.3f%% %12.2f\n", h, (long long)pairs[h], 100.0 * pairs[h] / grid,
               (double)pairs[h] / n);
    }
    printf("%-5s %18.0f %8.3f%% %12.2f\n", "total", total, 100.0 * total / (grid * heads),
           total / ((double)n * heads));
    fflush(stdout);

    if (png_path) {
        layout_geom g = layout_geometry(n, m, heads, px);
        if (g.drawn < heads) printf("png:    drawing the first %d of %d heads\n", g.drawn, heads);
        if (!g.exact)
            printf("png:    %lld pairs in %d head%s > %lld: each pixel samples a fixed 8 x 8 grid "
                   "of its %d x %d pairs (thin lines may be missed or faint)\n",
                   (long long)n * m * g.drawn, g.drawn, g.drawn == 1 ? "" : "s",
                   (long long)LAYOUT_EXACT_PAIRS, g.f, g.f);
        fflush(stdout);
        rc = layout_png(a, &g, png_path, counted);
        if (rc) goto done;
        const char *grey = g.f == 1  ? ""
                           : g.exact ? ", grey = fraction visible"
                                     : ", grey = fraction of the sample visible";
        char which[48];
        if (g.drawn == 1)
            snprintf(which, sizeof which, "head 0");
        else
            snprintf(which, sizeof which, "heads 0-%d left to right", g.drawn - 1);
        printf("png:    %s: %d x %d pixels, %s (queries down, keys across), 1 pixel = %d x %d "
               "pairs%s\n",
               png_path, g.width, g.rows, which, g.f, g.f, grey);
        /* every pair was asked: the picture and the counts must agree */
        if (g.exact)
            for (int h = 0; h < g.drawn; h++)
                if (counted[h] != pairs[h]) {
                    fprintf(stderr,
                            "eformer: layout: head %d: ef_attn_visible_pairs says %lld but "
                            "ef_attn_visible sees %lld pairs (a library bug: please report it)\n",
                            h, (long long)pairs[h], (long long)counted[h]);
                    rc = CLI_FAIL;
                }
    }
done:
    free(pairs);
    ef_attn_free(a);
    return rc;
}
