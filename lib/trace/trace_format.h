/* SPDX-License-Identifier: MIT */
/*
 * The allocation trace file format, shared by the tracer (lib/trace/trace.c) and
 * the reader (tools/trace_tool.c). Described in docs/trace-format.md.
 */
#ifndef TA_TRACE_FORMAT_H
#define TA_TRACE_FORMAT_H

#define TA_TRACE_MAGIC "TATRACE\0"
#define TA_TRACE_VERSION 1
#define TA_TRACE_HEADER_BYTES 32
#define TA_TRACE_CHUNK_MAGIC 0x4b4e4843u /* "CHNK" little-endian */
#define TA_TRACE_CHUNK_HEADER_BYTES 40

/* FNV-1a, 32 bits: the checksum of a chunk's payload. */
static inline unsigned ta_trace_checksum(const unsigned char *p, unsigned long n)
{
    unsigned h = 2166136261u;
    for (unsigned long i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

/* Event kinds and their values after (kind, dseq, dtime):
 *   MALLOC, CALLOC, VALLOC, PVALLOC: size, id
 *   MEMALIGN, ALIGNED_ALLOC, POSIX_MEMALIGN: size, alignment, id
 *   REALLOC: old id, size, new id
 *   FREE: id
 *   RSS: resident KiB
 * An id of 0 is NULL: a failed allocation, realloc(NULL, n), or a block
 * the tracer did not see allocated. */
enum {
    TA_EV_MALLOC = 1,
    TA_EV_CALLOC,
    TA_EV_REALLOC,
    TA_EV_FREE,
    TA_EV_MEMALIGN,
    TA_EV_ALIGNED_ALLOC,
    TA_EV_POSIX_MEMALIGN,
    TA_EV_VALLOC,
    TA_EV_PVALLOC,
    TA_EV_RSS,
    TA_EV_KINDS_
};

#endif
