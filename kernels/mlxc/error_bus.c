/* rmlx error bus, compiled into libmlxc.so.
 *
 * mlx-c has one process-wide error handler. Every image (the host binary and
 * each plugin cdylib) carries its own copy of mlx-rs, and each copy registers
 * its own handler, which writes into that image's thread-local error slot. If
 * the last registration simply won, errors raised in every other image would
 * lose their message. So the patched mlx-sys routes mlx_set_error_handler here:
 * every image subscribes, and the one real handler (owned by this library)
 * broadcasts each message to all subscribers on the calling thread. Whichever
 * image made the failing call finds the message in its own slot. */
#include <pthread.h>
#include <stddef.h>
#include "mlx/c/error.h"

#define RMLX_MAX_SUBSCRIBERS 256

typedef struct {
  mlx_error_handler_func fun;
  void* data;
} rmlx_subscriber;

static rmlx_subscriber subscribers[RMLX_MAX_SUBSCRIBERS];
static int subscriber_count = 0;
static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;

static void rmlx_error_bus_dispatch(const char* msg, void* unused) {
  (void)unused;
  rmlx_subscriber copy[RMLX_MAX_SUBSCRIBERS];
  pthread_mutex_lock(&bus_lock);
  int n = subscriber_count;
  for (int i = 0; i < n; i++) copy[i] = subscribers[i];
  pthread_mutex_unlock(&bus_lock);
  for (int i = 0; i < n; i++) copy[i].fun(msg, copy[i].data);
}

/* Returns 0 on success, 1 when the bus is full. Subscribing the same function
 * twice is a no-op. The first subscription installs the dispatcher. */
int rmlx_error_bus_subscribe(mlx_error_handler_func fun, void* data) {
  int status = 0;
  pthread_mutex_lock(&bus_lock);
  int found = 0;
  for (int i = 0; i < subscriber_count; i++)
    if (subscribers[i].fun == fun) found = 1;
  if (!found) {
    if (subscriber_count >= RMLX_MAX_SUBSCRIBERS) {
      status = 1;
    } else {
      subscribers[subscriber_count].fun = fun;
      subscribers[subscriber_count].data = data;
      subscriber_count++;
      if (subscriber_count == 1)
        mlx_set_error_handler(rmlx_error_bus_dispatch, NULL, NULL);
    }
  }
  pthread_mutex_unlock(&bus_lock);
  return status;
}

int rmlx_error_bus_subscribers(void) {
  pthread_mutex_lock(&bus_lock);
  int n = subscriber_count;
  pthread_mutex_unlock(&bus_lock);
  return n;
}
