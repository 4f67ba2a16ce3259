/* A program that is not Python when it starts: it dlopen()s libpython afterwards (after every
 * preload constructor ran) and runs the training script in it. usage: late_python LIBPYTHON
 * PYTHONHOME SCRIPT ARGS... */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <wchar.h>

int main(int argc, char **argv) {
    if (argc < 4)
        return 2;
    void *py = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
    if (!py) {
        fprintf(stderr, "%s\n", dlerror());
        return 2;
    }
    int (*bytes_main)(int, char **) = (int (*)(int, char **))dlsym(py, "Py_BytesMain");
    setenv("PYTHONHOME", argv[2], 1);
    char *pargv[64] = {"python"};
    int n = 1;
    for (int i = 3; i < argc && n < 63; i++)
        pargv[n++] = argv[i];
    return bytes_main(n, pargv);
}
