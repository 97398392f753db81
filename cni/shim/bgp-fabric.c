/*
 * bgp-fabric CNI plugin: the executable a CNI runtime (kubelet's containerd/CRI-O, `ctr run --cni`)
 * runs. It is only a transport: the bgp-fabric agent on the node does IPAM and the interface work.
 *
 *   runtime --exec--> this program --unix socket + SCM_RIGHTS--> agent (cni.server)
 *
 * Why a small C program and not Python: a CNI plugin is a new process per pod operation. This one
 * starts with ~40 page faults, a Python interpreter with ~700 before its first import (in the
 * user-mode-Linux lab kernel: ~13 ms vs 40-260 ms). The work itself is done by the running agent,
 * which has everything loaded. Measured in docs/cni.md.
 *
 * What it does:
 * - VERSION: answered here (no agent needed).
 * - ADD/CHECK/DEL: opens CNI_NETNS and a NETLINK_ROUTE socket created inside it (setns there and
 *   back), so the agent can configure the pod side without CAP_SYS_ADMIN; sends the CNI_* environment
 *   and the network configuration (stdin) with both descriptors to the agent's socket, named by the
 *   configuration's top-level "socket" key; prints the agent's answer and exits with its status.
 * - The agent unreachable: DEL deletes CNI_IFNAME inside the pod's namespace (the veth pair, and with
 *   it the host route, goes) and succeeds; the agent releases the address when it starts (its sweep
 *   finds the host side gone). Every other command fails with CNI error 11 (try again later), STATUS
 *   with 50 (plugin not available).
 *
 * Wire format (request): "BGPFABRIC-CNI 1\n", then "KEY=VALUE\0" for every CNI_* variable and
 * "BGPFABRIC_NETNS_ERROR=..." when CNI_NETNS could not be used, an empty entry "\0", then stdin as
 * is; the client shuts its write side down. Response: "<exit status>\n" then stdout as is.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

#define MAX_STDIN (1 << 20)
#define MAX_RESPONSE (4 << 20)
#define AGENT_TIMEOUT_S 60 /* the agent answers within its own 30 s deadline */
#define NETLINK_TIMEOUT_S 5
#define MAGIC "BGPFABRIC-CNI 1\n"
/* Keep in step with cni/spec.py SUPPORTED_VERSIONS (tests/unit/test_cni_shim.py compares them). */
#define VERSION_JSON                                                                                   \
  "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"

/* ---- small helpers ------------------------------------------------------------------------- */

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Reads fd to EOF into a malloc'd buffer (NUL-terminated); returns its length or -1. */
static ssize_t read_all(int fd, char **out, size_t limit) {
  size_t cap = 4096, len = 0;
  char *buf = malloc(cap + 1);
  if (!buf) return -1;
  for (;;) {
    if (len == cap) {
      if (cap >= limit) {
        free(buf);
        errno = EFBIG;
        return -1;
      }
      cap *= 2;
      char *nb = realloc(buf, cap + 1);
      if (!nb) {
        free(buf);
        return -1;
      }
      buf = nb;
    }
    ssize_t r = read(fd, buf + len, cap - len);
    if (r < 0) {
      if (errno == EINTR) continue;
      free(buf);
      return -1;
    }
    if (r == 0) break;
    len += (size_t)r;
  }
  buf[len] = 0;
  *out = buf;
  return (ssize_t)len;
}

/* A JSON string with quotes and escapes, for error messages. */
static void put_json_string(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
    else if (c < 0x20) fprintf(f, "\\u%04x", c);
    else fputc(c, f);
  }
  fputc('"', f);
}

/* A CNI error result on stdout (the spec's {cniVersion, code, msg, details}); returns exit status 1. */
static int cni_error(const char *version, int code, const char *msg, const char *details) {
  printf("{\"cniVersion\":");
  put_json_string(stdout, version);
  printf(",\"code\":%d,\"msg\":", code);
  put_json_string(stdout, msg);
  if (details && *details) {
    printf(",\"details\":");
    put_json_string(stdout, details);
  }
  printf("}\n");
  fflush(stdout);
  return 1;
}

/* ---- just enough JSON: one top-level string value --------------------------------------------- */

static const char *skip_ws(const char *p, const char *end) {
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
  return p;
}

/* Decodes the JSON string at p (which points at its opening quote) into out (if not NULL).
 * Returns the position after the closing quote, or NULL if malformed, too long or not ASCII-only. */
static const char *json_string(const char *p, const char *end, char *out, size_t outsz) {
  size_t n = 0;
  if (p >= end || *p != '"') return NULL;
  for (p++; p < end; p++) {
    char c = *p;
    if (c == '"') {
      if (out) out[n] = 0;
      return p + 1;
    }
    if (c == '\\') {
      if (++p >= end) return NULL;
      switch (*p) {
        case '"': c = '"'; break;
        case '\\': c = '\\'; break;
        case '/': c = '/'; break;
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'n': c = '\n'; break;
        case 'r': c = '\r'; break;
        case 't': c = '\t'; break;
        case 'u': {
          unsigned v = 0;
          if (end - p < 5) return NULL;
          for (int i = 1; i <= 4; i++) {
            char h = p[i];
            v <<= 4;
            if (h >= '0' && h <= '9') v |= (unsigned)(h - '0');
            else if (h >= 'a' && h <= 'f') v |= (unsigned)(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F') v |= (unsigned)(h - 'A' + 10);
            else return NULL;
          }
          if (v == 0 || v > 0x7f) return NULL; /* only ASCII in the values we read */
          c = (char)v;
          p += 4;
          break;
        }
        default: return NULL;
      }
    }
    if (out) {
      if (n + 1 >= outsz) return NULL;
      out[n++] = c;
    }
  }
  return NULL;
}

/* Skips one JSON value (string, number, literal, object, array). NULL if malformed. */
static const char *json_skip(const char *p, const char *end) {
  int depth = 0;
  p = skip_ws(p, end);
  do {
    if (p >= end) return NULL;
    if (*p == '"') {
      p = json_string(p, end, NULL, 0);
      if (!p) return NULL;
    } else if (*p == '{' || *p == '[') {
      depth++;
      p++;
    } else if (*p == '}' || *p == ']') {
      if (depth == 0) return NULL;
      depth--;
      p++;
    } else if (*p == ',' || *p == ':' || *p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
      if (depth == 0) return NULL;
      p++;
    } else { /* number or literal */
      while (p < end && !strchr(",:]} \t\r\n", *p)) p++;
    }
  } while (depth > 0);
  return p;
}

/* The top-level string value of `key` in the JSON object js[0:n]. 1 found, 0 absent, -1 malformed. */
static int json_top_string(const char *js, size_t n, const char *key, char *out, size_t outsz) {
  const char *p = js, *end = js + n;
  char name[64];
  p = skip_ws(p, end);
  if (p >= end || *p != '{') return -1;
  p = skip_ws(p + 1, end);
  if (p < end && *p == '}') return 0;
  for (;;) {
    int long_key = 0;
    const char *k = json_string(p, end, name, sizeof name);
    if (!k) { /* a key longer than `name` is not one we look for */
      k = json_string(p, end, NULL, 0);
      if (!k) return -1;
      long_key = 1;
    }
    p = skip_ws(k, end);
    if (p >= end || *p != ':') return -1;
    p = skip_ws(p + 1, end);
    if (!long_key && strcmp(name, key) == 0) {
      if (p >= end || *p != '"') return -1;
      return json_string(p, end, out, outsz) ? 1 : -1;
    }
    p = json_skip(p, end);
    if (!p) return -1;
    p = skip_ws(p, end);
    if (p < end && *p == ',') {
      p = skip_ws(p + 1, end);
      continue;
    }
    if (p < end && *p == '}') return 0;
    return -1;
  }
}

/* ---- netlink inside the pod's namespace --------------------------------------------------------- */

/* A NETLINK_ROUTE socket living in the namespace nsfd refers to (we go there and come back). */
static int netlink_in(int nsfd, char *err, size_t errsz) {
  int self = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  if (self < 0) {
    snprintf(err, errsz, "open /proc/self/ns/net: %s", strerror(errno));
    return -1;
  }
  if (setns(nsfd, CLONE_NEWNET) < 0) {
    snprintf(err, errsz, "setns into the pod's network namespace: %s", strerror(errno));
    close(self);
    return -1;
  }
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  int saved = errno;
  if (setns(self, CLONE_NEWNET) < 0) {
    /* Stuck in the pod's namespace: the agent's socket is a path (not abstract), so it is still
     * reachable; but say so and give nothing to the agent. */
    snprintf(err, errsz, "setns back to the runtime's network namespace: %s", strerror(errno));
    if (fd >= 0) close(fd);
    close(self);
    return -1;
  }
  close(self);
  if (fd < 0) snprintf(err, errsz, "netlink socket in the pod's namespace: %s", strerror(saved));
  return fd;
}

/* Deletes link `ifname` through netlink socket nl. 0 on success or when it does not exist. */
static int delete_link(int nl, const char *ifname) {
  struct {
    struct nlmsghdr n;
    struct ifinfomsg i;
    char attrs[64];
  } req;
  struct timeval tv = {NETLINK_TIMEOUT_S, 0};
  size_t len = strlen(ifname) + 1;
  if (len > IFNAMSIZ) return -1;
  memset(&req, 0, sizeof req);
  struct rtattr *rta = (struct rtattr *)req.attrs;
  rta->rta_type = IFLA_IFNAME;
  rta->rta_len = (unsigned short)RTA_LENGTH(len);
  memcpy(RTA_DATA(rta), ifname, len);
  req.n.nlmsg_len = NLMSG_LENGTH(sizeof req.i) + RTA_ALIGN(rta->rta_len);
  req.n.nlmsg_type = RTM_DELLINK;
  req.n.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
  req.n.nlmsg_seq = 1;
  req.i.ifi_family = AF_UNSPEC;
  setsockopt(nl, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (send(nl, &req, req.n.nlmsg_len, 0) < 0) return -1;
  char buf[4096];
  ssize_t r = recv(nl, buf, sizeof buf, 0);
  if (r < (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr))) return -1;
  struct nlmsghdr *h = (struct nlmsghdr *)buf;
  if (h->nlmsg_type != NLMSG_ERROR) return -1;
  int e = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
  return (e == 0 || e == -ENODEV) ? 0 : -1;
}

/* ---- talking to the agent ------------------------------------------------------------------------ */

static int connect_agent(const char *path) {
  struct sockaddr_un sa;
  struct timeval tv = {AGENT_TIMEOUT_S, 0};
  if (strlen(path) >= sizeof sa.sun_path) {
    errno = ENAMETOOLONG;
    return -1;
  }
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) return -1;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  strcpy(sa.sun_path, path);
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
    int e = errno;
    close(s);
    errno = e;
    return -1;
  }
  return s;
}

/* Sends the request; the first byte carries the descriptors (SCM_RIGHTS). 0 or -1. */
static int send_request(int s, const char *netns_error, const char *in, size_t inlen, int *fds, int nfds) {
  size_t cap = 4096, len = 0;
  char *hdr = malloc(cap);
  if (!hdr) return -1;
#define APPEND(str, n)                                                                                  \
  do {                                                                                                  \
    size_t _n = (n);                                                                                    \
    while (len + _n + 1 > cap) {                                                                        \
      cap *= 2;                                                                                         \
      char *_nb = realloc(hdr, cap);                                                                    \
      if (!_nb) {                                                                                       \
        free(hdr);                                                                                      \
        return -1;                                                                                      \
      }                                                                                                 \
      hdr = _nb;                                                                                        \
    }                                                                                                   \
    memcpy(hdr + len, (str), _n);                                                                       \
    len += _n;                                                                                          \
  } while (0)
  APPEND(MAGIC, strlen(MAGIC));
  for (char **e = environ; *e; e++) {
    if (strncmp(*e, "CNI_", 4) == 0) APPEND(*e, strlen(*e) + 1);
  }
  if (netns_error && *netns_error) {
    static const char key[] = "BGPFABRIC_NETNS_ERROR=";
    APPEND(key, sizeof key - 1);
    APPEND(netns_error, strlen(netns_error) + 1);
  }
  APPEND("", 1);
#undef APPEND
  struct iovec iov = {hdr, len};
  char cbuf[CMSG_SPACE(2 * sizeof(int))];
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    memset(cbuf, 0, sizeof cbuf);
    msg.msg_control = cbuf;
    msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
  }
  /* sendmsg may send part of it: the descriptors ride with the first byte; write the rest. */
  ssize_t sent;
  do {
    sent = sendmsg(s, &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) {
    free(hdr);
    return -1;
  }
  int rc = write_all(s, hdr + sent, len - (size_t)sent);
  free(hdr);
  if (rc < 0 || write_all(s, in, inlen) < 0) return -1;
  shutdown(s, SHUT_WR);
  return 0;
}

/* ---- main ---------------------------------------------------------------------------------------- */

int main(void) {
  const char *cmd = getenv("CNI_COMMAND");
  char *in = NULL;
  char version[32] = "1.0.0";
  char sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
  char nserr[512] = "";
  char details[768];
  int fds[2] = {-1, -1}, nfds = 0;

  signal(SIGPIPE, SIG_IGN);
  ssize_t inlen = read_all(0, &in, MAX_STDIN);
  if (inlen < 0) return cni_error(version, 5, "cannot read the network configuration from stdin", strerror(errno));
  if (!cmd || !*cmd) return cni_error(version, 4, "CNI_COMMAND is not set", "");
  if (strcmp(cmd, "VERSION") == 0) {
    fputs(VERSION_JSON, stdout);
    return 0;
  }
  if (json_top_string(in, (size_t)inlen, "cniVersion", version, sizeof version) != 1) strcpy(version, "1.0.0");
  int found = json_top_string(in, (size_t)inlen, "socket", sock, sizeof sock);
  if (found < 0) return cni_error(version, 6, "cannot decode the network configuration", "");
  if (found == 0)
    return cni_error(version, 7, "the network configuration has no \"socket\"",
                     "the path of the bgp-fabric agent's CNI socket, written by the agent into its conflist");

  int is_del = strcmp(cmd, "DEL") == 0;
  const char *netns = getenv("CNI_NETNS");
  const char *ifname = getenv("CNI_IFNAME");
  if (netns && *netns && (is_del || strcmp(cmd, "ADD") == 0 || strcmp(cmd, "CHECK") == 0)) {
    int nsfd = open(netns, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) {
      snprintf(nserr, sizeof nserr, "open %s: %s", netns, strerror(errno));
    } else {
      int nl = netlink_in(nsfd, nserr, sizeof nserr);
      if (nl >= 0) {
        fds[0] = nsfd;
        fds[1] = nl;
        nfds = 2;
      } else {
        close(nsfd);
      }
    }
  }

  int s = connect_agent(sock);
  if (s < 0 || send_request(s, nserr, in, (size_t)inlen, fds, nfds) < 0) {
    snprintf(details, sizeof details, "%s: %s", sock, strerror(errno));
    if (s >= 0) close(s);
    if (is_del) {
      /* Nothing must keep a pod from going away: remove its interface ourselves; the agent frees
       * the address when it starts again (the host side of the pair is gone). */
      if (nfds == 2 && ifname && *ifname && delete_link(fds[1], ifname) < 0)
        return cni_error(version, 11, "bgp-fabric agent not reachable and the pod interface could not be deleted",
                         details);
      return 0;
    }
    return cni_error(version, strcmp(cmd, "STATUS") == 0 ? 50 : 11, "bgp-fabric agent not reachable", details);
  }
  char *resp = NULL;
  ssize_t rlen = read_all(s, &resp, MAX_RESPONSE);
  int saved = errno;
  close(s);
  char *nl = rlen > 0 ? memchr(resp, '\n', (size_t)rlen) : NULL;
  if (!nl) {
    snprintf(details, sizeof details, "%s: %s", sock, rlen < 0 ? strerror(saved) : "connection closed");
    if (is_del) {
      if (nfds == 2 && ifname && *ifname) delete_link(fds[1], ifname);
      return 0;
    }
    return cni_error(version, 11, "bgp-fabric agent did not answer", details);
  }
  *nl = 0;
  int rc = atoi(resp);
  if (write_all(1, nl + 1, (size_t)(rlen - (nl + 1 - resp))) < 0) return 1;
  return rc;
}
