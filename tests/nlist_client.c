/*
 * nlist_client IMAGE NAME...
 *
 * Calls libbsd's nlist(3) once with every NAME and prints, per name,
 *     NAME n_type n_value
 * (n_type and n_value in hex), then one last line with nlist()'s return value:
 * the number of names not found, or "-1 strerror(errno)" on failure (exit 1).
 * Build: cc -O -Wall -o nlist_client nlist_client.c -lbsd
 */
#include <bsd/nlist.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
	struct nlist *nl;
	int i, n, rc, e;

	if (argc < 3) {
		fprintf(stderr, "usage: %s IMAGE NAME...\n", argv[0]);
		return 2;
	}
	n = argc - 2;
	nl = calloc((size_t)n + 1, sizeof(*nl));
	if (nl == NULL) {
		perror("calloc");
		return 2;
	}
	for (i = 0; i < n; i++)
		nl[i].n_un.n_name = argv[i + 2];
	nl[n].n_un.n_name = NULL;

	errno = 0;
	rc = nlist(argv[1], nl);
	e = errno;
	for (i = 0; i < n; i++)
		printf("%s %#x %#lx\n", argv[i + 2], (unsigned)nl[i].n_type,
		       (unsigned long)nl[i].n_value);
	if (rc < 0) {
		printf("-1 %s\n", strerror(e));
		return 1;
	}
	printf("%d\n", rc);
	return 0;
}
