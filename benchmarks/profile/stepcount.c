/* stepcount CMD...: runs CMD under ptrace; SIGUSR1 sent to the traced (main)
 * thread toggles counting; while counting, the thread is single-stepped and
 * every step (one retired instruction) counted.  Prints "STEPS i n" per span. */
#include <signal.h>
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    pid_t pid = fork();
    if (pid == 0) {
        ptrace(PTRACE_TRACEME, 0, 0, 0);
        execvp(argv[1], argv + 1);
        return 127;
    }
    int st, counting = 0, span = 0, sig = 0;
    long long n = 0;
    waitpid(pid, &st, 0);
    ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL);
    for (;;) {
        ptrace(counting ? PTRACE_SINGLESTEP : PTRACE_CONT, pid, 0, sig);
        sig = 0;
        if (waitpid(pid, &st, 0) < 0 || WIFEXITED(st) || WIFSIGNALED(st)) break;
        if (!WIFSTOPPED(st)) continue;
        int s = WSTOPSIG(st);
        if (s == SIGTRAP) { if (counting) n++; continue; }
        if (s == SIGUSR1) {
            if (counting) { fprintf(stderr, "STEPS %d %lld\n", span++, n); fflush(stderr); }
            counting = !counting; n = 0; continue;
        }
        sig = s;
    }
    return 0;
}
